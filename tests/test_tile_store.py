"""The store of timed kernel tiles: a later process reads what an earlier one timed on the same GPU model."""

import pytest
import torch

from ptq.quant import kernels

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="Triton is not installed")

KEY = (kernels.W8, kernels.ACT_INT8, False, 0, True, 16, 4096, 4096, 0, torch.bfloat16, torch.int8, False, None,
       torch.device("cpu"))  # fmt: skip
CANDIDATES = [(8, 4, 4, 1, kernels.ROWS), (16, 4, 4, 1, kernels.ROWS, kernels.PREFETCH), kernels.LIBRARY]


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """_config as on a GPU named "Test GPU": tuning on, the store in tmp_path, each candidate's time its first
    number (LIBRARY: 0.5)."""
    monkeypatch.setenv("PTQ_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "TUNE", True)
    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(kernels, "TILE_STORE", True)
    monkeypatch.setattr(kernels, "_tuned", {})
    monkeypatch.setattr(kernels, "tile_origins", {"timed": 0, "stored": 0})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    timed = []

    def bench(fn, rep, return_mode):
        return fn()

    def run(config):
        timed.append(config)
        return 0.5 if config == kernels.LIBRARY else float(config[0])

    monkeypatch.setattr(kernels.triton.testing, "do_bench_cudagraph", bench)
    return run, timed


def test_a_timed_tile_is_stored_and_read_back_by_the_next_process(tuning):
    run, timed = tuning
    assert kernels._config(KEY, CANDIDATES, run) == kernels.LIBRARY
    assert timed == CANDIDATES
    path = kernels.tile_store("Test GPU")
    assert kernels.read_tiles(path) == {kernels.key_text(KEY): kernels.LIBRARY}
    kernels._tuned.clear()  # a new process
    timed.clear()
    assert kernels._config(KEY, CANDIDATES, run) == kernels.LIBRARY
    assert timed == []  # nothing timed, nothing compiled
    assert kernels.tile_origins == {"timed": 1, "stored": 1}
    other_key = KEY[:6] + (14336,) + KEY[7:]
    assert kernels._config(other_key, CANDIDATES, run) == kernels.LIBRARY and timed == CANDIDATES  # timed anew
    assert len(kernels.read_tiles(path)) == 2


def test_a_stored_tile_that_is_no_longer_a_candidate_is_timed_again(tuning):
    run, timed = tuning
    kernels.write_tile(kernels.tile_store("Test GPU"), kernels.key_text(KEY), (999, 1, 1, 1, kernels.ROWS))
    assert kernels._config(KEY, CANDIDATES, run) == kernels.LIBRARY
    assert timed == CANDIDATES


def test_the_store_is_per_gpu_model_and_ignored_when_unreadable(tuning, tmp_path):
    run, timed = tuning
    assert kernels.tile_store("Test GPU") != kernels.tile_store("Other GPU")
    path = kernels.tile_store("Test GPU")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert kernels.read_tiles(path) == {}
    assert kernels._config(KEY, CANDIDATES, run) == kernels.LIBRARY and timed == CANDIDATES
    assert kernels.read_tiles(path) == {kernels.key_text(KEY): kernels.LIBRARY}  # the broken file replaced


def test_no_store_when_it_is_turned_off(tuning, monkeypatch):
    run, timed = tuning
    monkeypatch.setattr(kernels, "TILE_STORE", False)
    kernels._config(KEY, CANDIDATES, run)
    assert not kernels.tile_store("Test GPU").exists()


def test_a_store_that_cannot_be_written_costs_a_warning_not_the_run(tuning, tmp_path, monkeypatch, caplog):
    run, timed = tuning
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PTQ_CACHE", str(blocker))  # kernel_tiles/ would have to be made inside a file
    with caplog.at_level("WARNING", logger="ptq.quant.kernels"):
        assert kernels._config(KEY, CANDIDATES, run) == kernels.LIBRARY
    assert "kernel tiles not stored" in caplog.text


def test_cold_copies_fill_the_l2_twice_and_keep_each_tensors_strides():
    storage = torch.arange(64 * 48, dtype=torch.int32).reshape(64, 48)
    words = storage[:, 16:48]  # a view: 32 of 48 columns, its rows 48 apart
    scales = torch.rand(4, 32)
    weights = (words, scales, None)
    span = ((63 * 48 + 31) + 1) * 4 + 4 * 32 * 4  # bytes the view spans, and the scales'
    copies = kernels._cold_copies(weights, l2_bytes=span)  # twice the L2: the originals and one copy
    assert len(copies) == 2 and copies[0] is weights
    copy_words, copy_scales, none = copies[1]
    assert none is None and copy_words.stride() == words.stride() and torch.equal(copy_words, words)
    assert torch.equal(copy_scales, scales) and copy_words.data_ptr() != words.data_ptr()
    assert len(kernels._cold_copies(weights, l2_bytes=5 * span)) == 10
    assert len(kernels._cold_copies(weights, l2_bytes=10**12)) == kernels.MAX_COLD_COPIES
    assert kernels._cold_copies(weights, l2_bytes=span // 4) == [weights]  # past the L2 already
    odd = storage.view(-1)[1:1025]  # 4 bytes past an aligned start: a copy would be aligned, the kernel would differ
    assert kernels._cold_copies((odd, None, None), l2_bytes=10**6) == [(odd, None, None)]


def test_with_weights_each_candidate_is_timed_over_the_cold_copies(tuning, monkeypatch):
    _, _ = tuning
    calls = []

    def run(config, weights=None):
        calls.append((config, None if weights is None else weights[0].data_ptr()))

    def bench(fn, rep, return_mode):  # each run costs its tile's first number
        before = len(calls)
        fn()
        return sum(float(c[0]) if c != kernels.LIBRARY else 0.5 for c, _ in calls[before:])

    monkeypatch.setattr(kernels.triton.testing, "do_bench_cudagraph", bench)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"L2_cache_size": 4096}))
    weights = (torch.zeros(1024, dtype=torch.int32), torch.zeros(16), None)  # 4,160 bytes: two copies
    config = kernels._config(KEY, CANDIDATES, run, weights)
    assert config == kernels.LIBRARY  # per run 0.5 against 8 and 16, whatever the number of copies
    for candidate in CANDIDATES:
        pointers = [p for c, p in calls if c == candidate]
        assert len(pointers) == 2 and len(set(pointers)) == 2 and pointers[0] == weights[0].data_ptr()

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
    assert kernels.read_tiles(path) == {kernels._key_text(KEY): kernels.LIBRARY}
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
    kernels.write_tile(kernels.tile_store("Test GPU"), kernels._key_text(KEY), (999, 1, 1, 1, kernels.ROWS))
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
    assert kernels.read_tiles(path) == {kernels._key_text(KEY): kernels.LIBRARY}  # the broken file replaced


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

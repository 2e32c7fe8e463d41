import pytest
import torch

from ptq.data import DataError, eval_windows, load_text, sample_windows


def test_eval_windows_are_non_overlapping_from_the_start():
    ids = torch.arange(25)[None]
    w = eval_windows(ids, 10, None)
    assert w.tolist() == [list(range(10)), list(range(10, 20))]
    assert eval_windows(ids, 10, 1).shape == (1, 10)
    with pytest.raises(DataError, match="fewer than one window"):
        eval_windows(ids, 30, None)


def test_calibration_windows_are_seeded_and_recorded():
    ids = torch.arange(1000)[None]
    a, offsets_a = sample_windows(ids, 8, 32, seed=3)
    b, offsets_b = sample_windows(ids, 8, 32, seed=3)
    c, _ = sample_windows(ids, 8, 32, seed=4)
    assert torch.equal(a, b) and offsets_a == offsets_b and not torch.equal(a, c)
    for row, start in zip(a, offsets_a, strict=True):
        assert row.tolist() == list(range(start, start + 32))


def test_missing_local_data_without_hub_source_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="'c4' has no local copy and the hub (could not give|cannot be reached)"):
        load_text("c4", {"c4": __import__("ptq.data").data.EVAL_SETS["c4"]}, tmp_path)


def test_unknown_data_set_lists_the_valid_ones(tmp_path):
    from ptq.data import EVAL_SETS

    with pytest.raises(DataError, match="unknown data set 'wiki'.*ptb, wikitext2"):
        load_text("wiki", EVAL_SETS, tmp_path)

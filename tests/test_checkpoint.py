import pytest

from orchestrator import checkpoint


def test_commit_publishes_atomically_and_marks_last(tmp_path):
    def write(tmp):
        (tmp / "a.txt").write_text("x")
        assert not (tmp / checkpoint.MARKER).exists()

    final = checkpoint.commit(tmp_path / "ckpts" / "step-1", write)
    assert (final / "a.txt").read_text() == "x" and checkpoint.is_committed(final)
    assert [p.name for p in (tmp_path / "ckpts").iterdir()] == ["step-1"]  # no temp dir left


def test_failed_write_leaves_nothing(tmp_path):
    def write(tmp):
        (tmp / "partial").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoint.commit(tmp_path / "step-2", write)
    assert list(tmp_path.iterdir()) == []


def test_committed_checkpoint_is_never_overwritten(tmp_path):
    checkpoint.commit(tmp_path / "step-1", lambda t: (t / "v").write_text("1"))
    with pytest.raises(FileExistsError):
        checkpoint.commit(tmp_path / "step-1", lambda t: (t / "v").write_text("2"))
    assert (tmp_path / "step-1" / "v").read_text() == "1"


def test_uncommitted_dirs_are_ignored_and_prune_keeps_newest(tmp_path):
    for n in (1, 2, 3):
        checkpoint.commit(tmp_path / f"step-{n}", lambda t: None)
    (tmp_path / "step-4").mkdir()  # torn: no marker
    assert [n for n, _ in checkpoint.step_checkpoints(tmp_path)] == [1, 2, 3]
    checkpoint.prune(tmp_path, keep_last=2)
    assert [n for n, _ in checkpoint.step_checkpoints(tmp_path)] == [2, 3]


def test_keep_best_spares_the_lowest_eval_loss(tmp_path):
    import json

    losses = {1: 3.0, 2: 1.5, 3: 2.0, 4: None, 5: 2.5}
    for n, loss in losses.items():

        def write(t, loss=loss, n=n):
            (t / "state").mkdir()
            (t / "state" / "trainer_state.json").write_text(json.dumps({"step": n, "eval_loss": loss}))

        checkpoint.commit(tmp_path / f"step-{n}", write)
    checkpoint.prune(tmp_path, keep_last=2, keep_best=True)
    assert [n for n, _ in checkpoint.step_checkpoints(tmp_path)] == [2, 4, 5]
    checkpoint.prune(tmp_path, keep_last=1)
    assert [n for n, _ in checkpoint.step_checkpoints(tmp_path)] == [5]

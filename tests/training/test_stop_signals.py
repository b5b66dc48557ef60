"""A stopped run exits: a process forked inside the stop-signal block (a data-loader worker) is not
held by the training process's handler, and a stream's persistent workers stop when it closes."""

import os
import signal
import time
from pathlib import Path

import pytest

from homediff.training.stopping import StopSignals


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_ends_on_sigterm_while_the_parent_only_records_it(tmp_path):
    said = []
    with StopSignals(said.append, Path(tmp_path), single_process=True) as signals:
        ready, tell = os.pipe()
        child = os.fork()
        if child == 0:  # the child waits to be terminated, as a worker does
            os.write(tell, b"1")
            time.sleep(30)
            os._exit(0)
        os.read(ready, 1)  # a signal that comes while the child is still forking may be lost
        time.sleep(0.2)
        os.kill(child, signal.SIGTERM)
        _, status = os.waitpid(child, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # the parent stops after its step instead
        assert signals.received == signal.SIGTERM and said


def test_closing_a_stream_stops_its_persistent_workers(tmp_path):
    import multiprocessing

    from train_helpers import square_folder

    from homediff.training.batches import BatchStream
    from homediff.training.config import DatasetSection

    stream = BatchStream(DatasetSection(path=str(square_folder(tmp_path / "squares")), workers=1),
                         8, 2, seed=0)
    batches = stream.epoch(0, 0)  # suspended, as the training loop leaves it: it holds the loader
    next(batches)
    assert multiprocessing.active_children()  # the loader's worker
    stream.close()
    assert multiprocessing.active_children() == [] and stream.loader is None
    batches.close()

"""One rank of the stop-signal test (started by torchrun from test_distributed.py): the second
process alone gets SIGTERM during its third step. Each rank writes what it saw to ``rank{r}.json``."""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from train_helpers import tiny_config  # noqa: E402

from homediff.training.components import Builders  # noqa: E402
from homediff.training.loop import Trainer, end_processes  # noqa: E402
from homediff.training.objective import training_loss  # noqa: E402

torch.set_num_threads(1)  # two ranks on shared cores
out, data, text = map(Path, sys.argv[1:4])
config = tiny_config(data, text, stages=[{"resolution": 8, "batch_size": 2, "steps": 50}],
                     train={"checkpoint_every": 1000, "sample_prompts": []})


def loss(batch, parts, settings, generator):
    if trainer.rank == 1 and trainer.progress.step == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return training_loss(batch, parts, settings, generator)


trainer = Trainer(config, out / "run", builders=Builders(loss=loss))
record = {"returned": trainer.run(), "step": trainer.progress.step, "signal": trainer.signals.received}
(out / f"rank{trainer.rank}.json").write_text(json.dumps(record))
end_processes()

"""One rank of the 2-process FSDP test (started by torchrun from test_fsdp.py).

Trains a tiny config 6 steps unbroken, then 4 steps and a resume to 6, all under FSDP, and tries to
build a Muon trainer; writes what each rank saw to ``rank{r}.json``.
"""

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from train_helpers import tiny_config  # noqa: E402

from homediff.errors import ConfigError  # noqa: E402
from homediff.training.loop import Trainer, end_processes  # noqa: E402

torch.set_num_threads(1)  # two ranks on shared cores
out, data, text = map(Path, sys.argv[1:4])
# fixed precisions: an "auto" one is measured per run and could differ between the two runs
config = tiny_config(data, text, stages=[{"resolution": 8, "batch_size": 2, "lr": 0.5, "steps": 6,
                                          "tread_rate": 0.5}],
                     train={"checkpoint_every": 2, "keep_checkpoints": 0, "sample_prompts": [],
                            "mixed_precision": "no"})
text_options = dataclasses.replace(config.text_encoder.options, dtype="float32")
config = dataclasses.replace(config, text_encoder=dataclasses.replace(config.text_encoder,
                                                                      options=text_options))


def losses(trainer: Trainer) -> list[list]:
    return [list(x) for x in trainer.progress.losses]


whole = Trainer(config, out / "whole")
sharded = [name for name, p in whole.model.named_parameters() if isinstance(p, DTensor)]
whole.run()
first = Trainer(config, out / "split", max_steps=4)
first.run()
# the first process writes checkpoints while the others go on: wait until the last one is on disk
first.accelerator.wait_for_everyone()
resumed = Trainer(config, out / "split", resume="latest")
start = resumed.progress.step
resumed.run()
try:
    Trainer(dataclasses.replace(config, optimizer=dataclasses.replace(config.optimizer, name="muon")),
            out / "muon")
    muon = "accepted"
except ConfigError as err:
    muon = str(err)
record = {"muon": muon, "world": whole.accelerator.num_processes, "sharded": len(sharded),
          "parameters": len(list(whole.model.parameters())), "resumed_at": start,
          "whole": losses(whole), "resumed": losses(resumed)}
(out / f"rank{whole.rank}.json").write_text(json.dumps(record))
end_processes()

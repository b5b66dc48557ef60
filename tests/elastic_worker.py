"""One rank of the 2-process half of the elastic resume tests (started by torchrun from
test_elastic.py), with ``train_recording``'s per-image draws.

``tasks`` (a JSON table) names what to do, in order:
  ``down``: train stage STAGE of batch 2 one step into ``down/`` (resumed in one process later);
  ``up``: resume ``up/``, which one process began with grad_accum 2, to the end, checking that
  every process began with the checkpoint's weights (the first, which holds them whole under FSDP)
  and EMA;
  ``refused``: try to resume the checkpoint ``refused`` names (one process, grad_accum 1);
  ``shards``: train one step over tar shards into ``shards/``.
Each rank writes what it saw to ``rank{r}.json``.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from train_helpers import tiny_config, train_recording  # noqa: E402

from homediff.errors import CheckpointError  # noqa: E402
from homediff.training.checkpoint import Checkpoint  # noqa: E402
from homediff.training.loop import Trainer, end_processes  # noqa: E402

torch.set_num_threads(1)  # two ranks on shared cores
out, data, text = map(Path, sys.argv[1:4])
stage, tasks = json.loads(sys.argv[4]), json.loads(sys.argv[5])
train = {"keep_checkpoints": 0, "sample_prompts": []}


def steps(run) -> dict:
    return {"images": run.images, "losses": run.losses, "norms": run.norms}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


record = {}
if "down" in tasks:
    config = tiny_config(data, text, stages=[{**stage, "batch_size": 2}], train=train)
    record["down"] = steps(train_recording(config, out / "down", max_steps=1))
if "up" in tasks:
    config = tiny_config(data, text, stages=[{**stage, "batch_size": 2, "grad_accum": 2}], train=train)
    checkpoint = out / "up" / "checkpoints" / "step-00000001"
    saved = Checkpoint.load(checkpoint)
    run = train_recording(config, out / "up", resume=str(checkpoint))
    record["up"] = {**steps(run), "sharded": run.trainer.fsdp,
                    "intact": same(run.initial, saved.model) if run.initial else None,
                    "ema_intact": same(run.initial_ema["shadow"], saved.ema["shadow"])
                    and run.initial_ema["updates"] == saved.ema["updates"]}
if "refused" in tasks:
    config = tiny_config(data, text, stages=[{**stage, "batch_size": 4}], train=train)
    try:
        Trainer(config, Path(tasks["refused"]).parents[1], resume=tasks["refused"])
        record["refused"] = "accepted"
    except CheckpointError as err:
        record["refused"] = str(err)
if "shards" in tasks:
    config = tiny_config(data, text, stages=[{**stage, "batch_size": 2}], train=train,
                         dataset={"path": tasks["shards"], "workers": 0})
    Trainer(config, out / "shards", max_steps=1).run()
rank = torch.distributed.get_rank()
(out / f"rank{rank}.json").write_text(json.dumps(record))
end_processes()

"""One rank of the 2-process training test (started by torchrun from test_train_distributed.py)."""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from train_helpers import tiny_config  # noqa: E402

from homediff.train import Trainer  # noqa: E402

out, data, text = map(Path, sys.argv[1:4])
config = tiny_config(data, text, stages=[{"resolution": 8, "batch_size": 2, "steps": 4}],
                     train={"checkpoint_every": 2, "keep_checkpoints": 0, "sample_prompts": []},
                     optimizer={"name": sys.argv[4]})
keys: list[str] = []
trainer = Trainer(config, out / "run")
trainer.run(callback=lambda progress, batch: keys.extend(batch["key"]))
weights = hashlib.sha256(b"".join(v.numpy().tobytes() for v in trainer.unwrapped.state_dict().values()))
record = {"keys": keys, "weights": weights.hexdigest(), "world": trainer.accelerator.num_processes}
(out / f"rank{trainer.rank}.json").write_text(json.dumps(record))

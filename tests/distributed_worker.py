"""One rank of the 2-process training test (started by torchrun from test_train_distributed.py).

Random draws are made per image (``train_recording``), so that the test can compare these two
processes of batch 2 with one process of batch 4 over the same images."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from safetensors.torch import save_file  # noqa: E402
from train_helpers import tiny_config, train_recording  # noqa: E402

from homediff.training.loop import end_processes  # noqa: E402

out, data, text = map(Path, sys.argv[1:4])
stage = json.loads(sys.argv[4])
optimizer = json.loads(sys.argv[5])
config = tiny_config(data, text, stages=[stage], optimizer=optimizer,
                     train={"checkpoint_every": 2, "keep_checkpoints": 0, "sample_prompts": []})
run = train_recording(config, out / "run")
trainer = run.trainer
record = {"steps": run.images, "losses": run.losses, "norms": run.norms,
          "world": trainer.accelerator.num_processes}
save_file({k: v.contiguous() for k, v in trainer.unwrapped.state_dict().items()},
          str(out / f"weights-rank{trainer.rank}.safetensors"))
(out / f"rank{trainer.rank}.json").write_text(json.dumps(record))
end_processes()

"""``train.compile``: torch.compile where it pays on this machine, decided by measurement.

torch.compile fuses the backbone's small element-wise operations (the modulated normalisations,
RoPE, SwiGLU, the residual gates) into generated kernels, which shortens a training step on CPUs
and GPUs alike; but compiling takes tens of seconds, which a short run never earns back, and the
gain differs by machine and model. ``"auto"`` (the default) therefore measures, within the run:

1. ``WARMUP_STEPS`` steps, then ``EAGER_STEPS`` eager steps timed;
2. the backbone is compiled when the time left (the stage's remaining steps at that pace, or the
   time budget left) times the expected saving exceeds the expected compile time. Expected: what an
   earlier run measured on this machine for this model and step (remembered in the user cache, like
   the precisions), else ``PRIOR_SAVING`` and ``PRIOR_COMPILE_SECONDS``;
3. the first compiled step compiles (its extra time is the compile time); then the next
   2 × ``COMPARED_STEPS`` steps alternate between the eager and the compiled backbone (the same
   weights: both train), so that a shared machine's drift hits both alike, and the compiled one
   stays when its median step is at least ``MIN_SPEEDUP`` times faster with finite losses.
   Otherwise training goes on eagerly. The measurement is remembered, so that the next run here
   expects what this one found (and does not try where compiling did not pay).

An error of torch.compile itself (``is_compile_error``: a compiler bug, e.g. generated C++ that does
not compile) is remembered as a failure like a compiled step's non-finite loss; one process then
redoes the step eagerly and trains on, several stop with that advice (their data-parallel step is
half done), and the same run started again trains eagerly.

Every process takes the same decision (timings are averaged over processes), at the same step.
The decision holds for the rest of the run (later stages recompile for their shapes). ``true``
compiles from the first step, ``false`` never compiles.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from homediff.caching import cache_key, json_file_cache, user_cache_dir
from homediff.precision import machine_key

WARMUP_STEPS = 2  # first steps allocate and warm caches: not timed
EAGER_STEPS = 6
COMPARED_STEPS = 8  # steps of each backbone, alternating, once compiled
#: Without a remembered measurement: compiled steps take this much less time, and compiling takes
#: this long (the tiny recipe on a 2-core CPU measured about 0.2 and 45 s: benchmarks/RESULTS.md).
PRIOR_SAVING = 0.15
PRIOR_COMPILE_SECONDS = 60.0
#: Compiled steps must be at least this much faster to be kept: below it a shared machine's noise
#: could decide, and a compiled model is harder to debug for no real gain.
MIN_SPEEDUP = 1.05
METHOD = 3  # how a measurement is made: measurements made another way are not remembered here
# (3: failures are marked as such, and an emulated instruction set no longer reuses native kernels)


def is_compile_error(error: BaseException) -> bool:
    """Whether ``error`` is torch.compile's own (its compiler or its generated code failed), not
    the model's or the data's."""
    from torch._dynamo.exc import BackendCompilerFailed  # inductor's InductorError among them

    return isinstance(error, BackendCompilerFailed)


def compile_backbone(module: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(module)``, its generated kernels cached apart per CPU instruction-set
    setting (``separate_kernel_cache``)."""
    separate_kernel_cache()
    return torch.compile(module)


def separate_kernel_cache() -> None:
    """Where ATen's CPU kernels are held to an instruction set (``ATEN_CPU_CAPABILITY``, as when an
    AVX2 laptop is emulated on a newer CPU), keep inductor's kernel cache apart from the one of
    unrestricted runs: kernels cached by a run at the other setting were reused, and the compiled
    step gave non-finite losses. A cache folder the user chose (``TORCHINDUCTOR_CACHE_DIR``) stays;
    inductor's default, which it writes into the environment once asked (wrapping a model for data
    parallelism asks), counts as none chosen."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    default = os.path.abspath(default_cache_dir())
    if capability and os.environ.get("TORCHINDUCTOR_CACHE_DIR", default) == default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default, f"aten-{capability}")


@dataclass(frozen=True)
class Measurement:
    """What compiling did for one model and step on one machine."""

    saving: float  # 1 - compiled step time / eager step time (negative: compiled is slower; 0 if failed)
    compile_seconds: float
    failed: bool = False  # compiling raised an error, or a compiled step gave a non-finite loss


class AutoCompile:
    """The ``"auto"`` decision, fed one call of ``step_done`` per optimiser step; each returns the
    backbone the next step must run, ``"compiled"`` or ``"eager"``, when it changes, else None.

    ``depends_on``: what the measurement depends on besides the machine and torch (the model's
    config, the step's shapes, the processes); ``agree`` averages a number over the processes;
    ``say`` reports the decision."""

    def __init__(self, depends_on: tuple, device: torch.device, agree: Callable[[float], float],
                 say: Callable[[str], None]):
        self.key = cache_key(METHOD, machine_key(device), torch.__version__, *depends_on)
        self.agree, self.say = agree, say
        self.phase = "eager"  # → "compiling" → "comparing" → "done"
        self.running = "eager"  # the backbone of the step under way
        self.stamps: list[float] = []
        self.compared: dict[str, list[float]] = {"eager": [], "compiled": []}
        self.eager_seconds = self.compile_seconds = 0.0
        self.decision = "undecided"

    def step_done(self, now: float, seconds_left: Callable[[float], float]) -> str | None:
        """After an optimiser step at clock ``now``; ``seconds_left(step_seconds)``: the time the
        run has left at that step time."""
        self.stamps.append(now)
        if self.phase == "eager" and len(self.stamps) == WARMUP_STEPS + EAGER_STEPS + 1:
            timed = self.stamps[WARMUP_STEPS:]
            self.eager_seconds = self._median([end - start for start, end in zip(timed, timed[1:])])
            return self._switch(self._try_compile(seconds_left(self.eager_seconds)))
        if self.phase == "compiling":  # this step compiled the backbone, then ran it
            self.compile_seconds = max(0.0, self.agree(now - self.stamps[-2]) - self.eager_seconds)
            self.phase = "comparing"
            return self._switch("eager")
        if self.phase == "comparing":
            self.compared[self.running].append(now - self.stamps[-2])
            if min(map(len, self.compared.values())) == COMPARED_STEPS:
                return self._switch(self._keep_or_revert())
            return self._switch("compiled" if self.running == "eager" else "eager")
        return None

    def failed(self, why: str = "a compiled step gave a non-finite loss") -> str | None:
        """A non-finite loss, or (``why``) an error of torch.compile: where the compiled backbone
        ran that step, back to eager steps, and remembered so that no run here tries again."""
        if self.phase not in ("compiling", "comparing") or self.running != "compiled":
            return None
        self._finish("eager", why)
        self._remember(Measurement(saving=0.0, compile_seconds=self.compile_seconds, failed=True))
        return self._switch("eager")

    def _switch(self, to: str | None) -> str | None:
        if to is not None:
            self.running = to
        return to

    def _try_compile(self, seconds_left: float) -> str | None:
        remembered = self._remembered()
        expected = remembered or Measurement(PRIOR_SAVING, PRIOR_COMPILE_SECONDS)
        source = "measured here before" if remembered else "expected"
        if expected.failed:
            self._finish("eager", "torch.compile failed here before (an error, or a compiled step's "
                         "non-finite loss); train.compile = true compiles anyway")
            return None
        if seconds_left * expected.saving <= expected.compile_seconds:
            self._finish("eager", f"{seconds_left:.0f} s of training left at "
                         f"{self.eager_seconds:.3f} s/step would save "
                         f"{seconds_left * max(expected.saving, 0):.0f} s, less than the "
                         f"{expected.compile_seconds:.0f} s a compile takes ({source})")
            return None
        self.phase = "compiling"
        self.say(f"compile: trying torch.compile ({seconds_left:.0f} s of training left at "
                 f"{self.eager_seconds:.3f} s/step; {source}: {expected.saving:.0%} faster steps "
                 f"after a {expected.compile_seconds:.0f} s compile)")
        return "compiled"

    def _keep_or_revert(self) -> str:
        eager, compiled = (self._median(self.compared[kind]) for kind in ("eager", "compiled"))
        speedup = eager / compiled
        self._remember(Measurement(1 - compiled / eager, self.compile_seconds))
        how = (f"{compiled:.3f} s/step compiled against {eager:.3f} eager, alternating, "
               f"{speedup:.2f}×; compiling took {self.compile_seconds:.0f} s")
        if speedup >= MIN_SPEEDUP:
            self._finish("compiled", how)
            return "compiled"
        self._finish("eager", f"{how}: below {MIN_SPEEDUP}×")
        return "eager"

    def _finish(self, decision: str, why: str) -> None:
        self.phase, self.decision = "done", decision
        self.say(f"compile: {decision} ({why})")

    def _median(self, seconds: list[float]) -> float:
        """The median step time, averaged over the processes."""
        return self.agree(statistics.median(seconds))

    def _remembered(self) -> Measurement | None:
        content = _memory().get(self.key)
        try:
            return Measurement(float(content["saving"]), float(content["compile_seconds"]),
                               bool(content["failed"]))
        except (TypeError, KeyError, ValueError):
            return None

    def _remember(self, measured: Measurement) -> None:
        _memory().put(self.key, {"saving": measured.saving, "compile_seconds": measured.compile_seconds,
                                 "failed": measured.failed})


def _memory():
    return json_file_cache(user_cache_dir("compile"))

"""log.profile_steps=A-B: a TensorFlow profiler trace of steps A..B, every rank into
RUN/profile/rank-R/ (TensorBoard's profile tab reads it: `tensorboard --logdir
RUN/profile/rank-0`; the trace itself is plugins/profile/<time>/<host>.xplane.pb).

Calls of steps are cut after step A-1 and after step B, so the trace holds the calls of steps
A..B and nothing else of training: no step outside the window, whatever train.steps_per_call.
A run resumed inside the window traces what is left of it.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.runtime.hooks import Hook

PROFILE = "profile"


def trace_dir(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / PROFILE / f"rank-{rank}"


class ProfileHook(Hook):
    def __init__(self, window: tuple[int, int], logdir: Path, say, profiler=None):
        self.first, self.last = window
        self.logdir, self.say = Path(logdir), say
        self._profiler = profiler  # tf.profiler.experimental, or a stand-in with start/stop
        self.active = self.started = False

    def ends_call_after(self, step: int) -> bool:
        return step in (self.first - 1, self.last)

    def on_call(self, first: int, last: int) -> None:
        if not self.active and self.first <= first <= self.last:
            p = self._api()
            self.logdir.mkdir(parents=True, exist_ok=True)
            p.start(str(self.logdir), options=p.ProfilerOptions(host_tracer_level=2, python_tracer_level=0,
                                                                device_tracer_level=1))
            self.active = self.started = True

    def on_call_done(self, last: int) -> None:
        if self.active and last >= self.last:
            self._stop()
            self.say(f"profile: steps {self.first}-{self.last} traced in {self.logdir}")

    def on_end(self, state) -> None:
        if self.active:  # the run ended inside the window (a stop signal, a target reached)
            self._stop()
        elif not self.started:
            self.say(f"profile: steps {self.first}-{self.last} were not run here (the loop ended after step "
                     f"{state.step}); nothing traced")

    def _stop(self) -> None:
        self._api().stop()
        self.active = False

    def _api(self):
        if self._profiler is None:
            import tensorflow as tf

            self._profiler = tf.profiler.experimental
        return self._profiler


def for_run(text: str, run_dir: Path, rank: int, say) -> ProfileHook | None:
    from pipeline.config import profile_window

    window = profile_window(text)
    return ProfileHook(window, trace_dir(run_dir, rank), say) if window else None

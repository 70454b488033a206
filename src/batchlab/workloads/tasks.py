"""Built-in trainable tasks for sweeps: offline data with a held-out validation split.

Each task is a :class:`Task`, a picklable factory ``task(batch_size, lr, seed) -> SupervisedRun`` (so it
travels to Ray workers); the data is built once per process and cached.

- ``mlp-digits``: sklearn's bundled 8x8 digits (1797 real images), 80/20 split -> 1438 train / 359 val
  (:func:`~batchlab.workloads.examples.digits_split`, the ``mlp-digits`` workload's own); MLP 64-256-256-10
  with Adam, as that workload.
- ``mnist1d``: MNIST-1D (Greydanus 2020), 4000 train / 1000 test sequences of length 40 generated offline
  by ``mnist1d.data.make_dataset(get_dataset_args())`` (its ``get_dataset()`` downloads; never called);
  MLP 40-256-256-10 with Adam. Needs ``pip install mnist1d``.
- ``char-lm``: a character-level language model of the Python standard library's own source
  (:func:`batchlab.workloads.corpus.stdlib_corpus`, split by file): 60000 train / 8000 val windows of 16
  bytes sampled (seed 0) from the train and validation streams, each labelled with the byte that follows;
  embedding 16 per byte, MLP 256-256-256 over the window (Bengio et al. 2003's neural LM, tiny), Adam.
- ``teacher-student``: synthetic -- 32-d Gaussian inputs labelled by sampling from a fixed random teacher
  MLP's softmax (so the labels carry noise, as real labels do); 8192 train / 2048 val; student MLP
  32-128-128-10 with Adam. Generated in milliseconds: the fast task for tests.

``load_task(spec, device=...)`` also takes ``path/to/file.py:function`` or ``module:function``: a function
called with no arguments that returns either

- a :class:`~batchlab.Workload` -- the same function ``fit``, ``profile``, ``noise`` and ``plan`` take -- with
  ``workload.validation`` set: it is called once per run (:class:`~batchlab.sweeps.WorkloadFactory`), or
- a factory ``(batch_size, lr, seed) -> Trainable``, e.g. of :class:`~batchlab.sweeps.SupervisedRun`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from batchlab import checks
from batchlab.devices import parse_device
from batchlab.errors import WorkloadError
from batchlab.spec import parse_amp
from batchlab.sweeps import NOISE_EVERY, SupervisedRun, WorkloadFactory
from batchlab.sweeps.trainable import OPTIONS, close_run
from batchlab.workload.workload import Workload
from batchlab.workloads import load_callable
from batchlab.workloads.examples import Split, digits_split

__all__ = ["Task", "TASKS", "ConfiguredFactory", "load_task", "describe_tasks"]


@functools.cache
def _mnist1d() -> Split:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise ImportError("the mnist1d task needs the mnist1d package: pip install mnist1d") from None
    data = make_dataset(get_dataset_args())  # generated offline from templates, ~5 s; get_dataset() downloads
    x, y = torch.tensor(data["x"], dtype=torch.float32), torch.tensor(data["y"], dtype=torch.long)
    xt, yt = torch.tensor(data["x_test"], dtype=torch.float32), torch.tensor(data["y_test"], dtype=torch.long)
    mean, std = x.mean(), x.std()
    return ((x - mean) / std, y), ((xt - mean) / std, yt)


@functools.cache
def _teacher_student(n_train: int = 8192, n_val: int = 2048, dim: int = 32, classes: int = 10) -> Split:
    generator = torch.Generator().manual_seed(1234)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        teacher = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, classes))
    x = torch.randn(n_train + n_val, dim, generator=generator)
    with torch.no_grad():
        logits = teacher(x) * 3.0  # temperature 1/3: labels mostly follow the teacher, ~20% do not
    y = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


CHAR_CONTEXT = 16  # bytes of context per prediction: enough for a keyword or an identifier, cheap on a CPU
CHAR_SAMPLES = (60000, 8000)  # train / val windows: a few epochs of a small sweep, ~1 MB of int64 inputs


@functools.cache
def _char_lm() -> Split:
    from batchlab.workloads.corpus import stdlib_corpus

    corpus = stdlib_corpus()
    generator = torch.Generator().manual_seed(0)
    splits = []
    for split, count in zip(("train", "val"), CHAR_SAMPLES):
        stream = corpus.stream(split)
        start = torch.randint(0, len(stream) - CHAR_CONTEXT, (count,), generator=generator)
        windows = stream[start[:, None] + torch.arange(CHAR_CONTEXT + 1)]
        splits.append((windows[:, :CHAR_CONTEXT], windows[:, CHAR_CONTEXT]))
    return splits[0], splits[1]


def _char_mlp() -> nn.Module:
    from batchlab.workloads.corpus import VOCAB_SIZE

    embedding = 16
    return nn.Sequential(
        nn.Embedding(VOCAB_SIZE, embedding),
        nn.Flatten(),
        _mlp((CHAR_CONTEXT * embedding, 256, 256, VOCAB_SIZE)),
    )


def _mlp(sizes: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


_DATA: dict[str, Callable[[], Split]] = {
    "mlp-digits": digits_split,
    "mnist1d": _mnist1d,
    "teacher-student": _teacher_student,
    "char-lm": _char_lm,
}
_LAYERS = {
    "mlp-digits": (64, 256, 256, 10),
    "mnist1d": (40, 256, 256, 10),
    "teacher-student": (32, 128, 128, 10),
}
_DESCRIPTIONS = {
    "mlp-digits": "MLP on sklearn's digits (real, 1438 train / 359 val), Adam",
    "mnist1d": "MLP on MNIST-1D generated offline (4000 train / 1000 val), Adam",
    "teacher-student": "MLP student of a random teacher MLP (synthetic, 8192 train / 2048 val), Adam",
    "char-lm": "byte-level LM of the Python standard library's source (60000 / 8000 windows of 16), Adam",
}


def _model(name: str) -> nn.Module:
    return _char_mlp() if name == "char-lm" else _mlp(_LAYERS[name])


@dataclass(frozen=True)
class Task:
    """A built-in task: call it as ``task(batch_size, lr, seed)`` for a fresh :class:`SupervisedRun`.

    The model's initialisation is seeded with ``seed`` inside ``torch.random.fork_rng`` (the caller's global
    RNG is left as it was), so every batch size starts from the same weights for a given seed.
    """

    name: str
    device: str = "cpu"
    accumulation: int = 1
    amp: str | None = None
    noise_every: int | None = NOISE_EVERY

    def data(self) -> Split:
        """The task's ``((train x, y), (validation x, y))`` on the CPU, built once per process."""
        return _DATA[self.name]()

    @property
    def dataset_size(self) -> int:
        return len(self.data()[0][0])

    def model(self, seed: int) -> nn.Module:
        """The task's model, untrained, on the task's device: the weights each of its runs with ``seed`` starts
        from (for a loop or a benchmark of one's own on the task's data). The caller's global RNG is left as
        it was."""
        seed = checks.integer("seed", seed, minimum=0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _model(self.name).to(self.device)

    def __call__(self, batch_size: int, lr: float, seed: int) -> SupervisedRun:
        train, val = self.data()
        model = self.model(seed)
        return SupervisedRun(
            model,
            torch.optim.Adam(model.parameters(), lr=lr),
            nn.functional.cross_entropy,
            train,
            val,
            batch_size=batch_size,
            seed=seed,
            accumulation=self.accumulation,
            amp=self.amp,
            noise_every=self.noise_every,
            name=self.name,
        )


TASKS = tuple(_DATA)


def describe_tasks() -> dict[str, str]:
    """Name -> one-line description, for ``--help``."""
    return dict(_DESCRIPTIONS)


# A sweep flag -> the attribute through which a trainable says what it does, and what a trainable without
# the attribute does: batchlab.sweeps.execute_run reads device, accumulation and precision with these defaults.
_OPTION_ATTRIBUTES: dict[str, str] = {
    "device": "device",
    "accumulation": "accumulation",
    "amp": "precision",
    "noise_every": "noise_every",
}
_ATTRIBUTE_DEFAULTS = {"device": "cpu", "accumulation": 1, "precision": "fp32"}


def _same(option: str, have: Any, wanted: Any) -> bool:
    """Does a trainable's attribute already do what a flag asks? (``cuda`` is any ``cuda:N``.)"""
    if have is None:
        return False
    if option == "device":
        have, wanted = torch.device(have), torch.device(wanted)
        return have.type == wanted.type and wanted.index in (None, have.index)
    return str(have) == str(wanted)


class ConfiguredFactory:
    """A user's run factory with ``batchlab sweep``'s ``--device/--accumulation/--amp/--noise-every`` applied.

    Each run the factory builds that has ``with_options`` (:class:`~batchlab.sweeps.SupervisedRun`, the
    :class:`~batchlab.sweeps.WorkloadRun` of a Workload's function) is rebuilt with the flags. Any other
    trainable cannot be changed from outside: it must
    already do what each flag asks (its ``device``, ``accumulation``, ``precision``, ``noise_every``
    attribute equal to the flag's value), else a one-line :class:`~batchlab.errors.WorkloadError` names the
    flag -- a flag is never silently dropped. :meth:`check` builds one run to find that out before a sweep
    starts. ``sweep_options`` (the normalised flags) joins the sweep's fingerprint, so a sweep with other
    flags is another sweep. Picklable when the factory is (Ray ships it to the workers).
    """

    def __init__(self, factory: Callable[..., Any], **options: Any):
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise TypeError(f"unknown sweep option(s) {', '.join(sorted(unknown))}")
        self.factory = factory
        self.name = getattr(factory, "name", None) or getattr(factory, "__name__", type(factory).__name__)
        self.dataset_size = getattr(factory, "dataset_size", None)
        self.sweep_options = dict(options)

    def __call__(self, batch_size: int, lr: float, seed: int) -> Any:
        run = self.factory(batch_size, lr, seed)
        if callable(getattr(run, "with_options", None)):
            changes = dict(self.sweep_options)
            if changes.get("amp") == "fp32":
                changes["amp"] = None  # with_options' fp32
            return run.with_options(**changes)
        for option, value in self.sweep_options.items():
            attribute = _OPTION_ATTRIBUTES[option]
            have = getattr(run, attribute, _ATTRIBUTE_DEFAULTS.get(attribute))
            if not _same(option, have, value):
                close_run(run)
                flag = "--" + option.replace("_", "-")
                raise WorkloadError(
                    f"{flag} {value} cannot be applied to the {type(run).__name__} the factory built (its "
                    f"{attribute} is {have!r}): only a run with with_options() (batchlab.sweeps.SupervisedRun, "
                    f"a Workload's) can be rebuilt with it; set it in the factory or drop {flag}"
                )
        return run

    def check(self, batch_size: int, lr: float) -> None:
        """Build (and close) one run, so a flag its runs cannot take fails before any training."""
        close_run(self(batch_size, lr, 0))


def load_task(
    spec: str,
    *,
    device: str | None = None,
    accumulation: int | None = None,
    amp: str | None = None,
    noise_every: int | None = None,
) -> Callable[..., Any]:
    """The factory a ``--workload`` spec names for a sweep: a built-in :class:`Task` or a user's function.

    A built-in task is built on ``device`` (None: the CPU; ``"auto"``: CUDA when available) with the options
    given (None: the task's default -- one micro-batch, fp32, the noise scale every ``NOISE_EVERY`` steps).
    A user's function returns a Workload (run through :class:`~batchlab.sweeps.WorkloadFactory`) or a run
    factory; either keeps its own settings, and each option given (a ``device`` other than None/``"auto"``,
    which leave the model where the function puts it) is applied to its runs by :class:`ConfiguredFactory`,
    or refused there with a one-line error.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise WorkloadError(f"invalid task {spec!r}: expected one of {', '.join(TASKS)} or path.py:function")
    spec = spec.strip()
    checks.integer("accumulation", accumulation, none=True)
    checks.integer("noise_every", noise_every, minimum=0, none=True)
    options: dict[str, Any] = {"accumulation": accumulation, "noise_every": noise_every}
    if amp is not None:
        options["amp"] = parse_amp(amp) or "fp32"  # "fp32" (no autocast) is a choice too, unlike None
    options = {name: value for name, value in options.items() if value is not None}
    if spec in _DATA:
        if options.get("amp") == "fp32":
            del options["amp"]  # a Task's fp32 is amp=None
        return Task(spec, device="cpu" if device is None else str(parse_device(device)), **options)
    if ":" not in spec:
        raise WorkloadError(
            f"unknown task {spec!r}: expected one of {', '.join(TASKS)}, path.py:function or module:function "
            "(a function returning a batchlab.Workload or a factory (batch_size, lr, seed) -> trainable)"
        )
    function = load_callable(spec, kind="task")
    made = function()
    if isinstance(made, Workload):
        factory: Callable[..., Any] = WorkloadFactory(function, source=spec, probe=made)
    elif callable(made):
        factory = made
    else:
        raise WorkloadError(
            f"{spec} returned {type(made).__name__}; expected a batchlab.Workload (with validation data) or a "
            "factory (batch_size, lr, seed) -> trainable"
        )
    if device is not None and device.strip().lower() != "auto":
        options["device"] = str(parse_device(device))
    return ConfiguredFactory(factory, **options) if options else factory

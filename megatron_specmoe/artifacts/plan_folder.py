"""The plan artifact: what ``specmoe plan`` writes and the runtime loads.

Notation
    L: MoE layers.   E: routed experts per layer.   k: top-k.   P: EP size.

A plan is a folder::

    plan.json      header (PlanHeader) + each predictor's JSON config + the list of arrays
    tensors.npz    every array: placements and predictor tensors (zip of .npy, no pickles)

``plan.json`` records the sha256 of ``tensors.npz`` (``checksum``) and the sha256 of its own
canonical JSON without that one field (``header_sha256``); loading checks both, the format
version and that every listed array is present (and nothing else), so an edited header (say
``"ep_size": 4`` changed to 2) is refused like edited tensors. Both files are read only if they
are regular files (a FIFO would hang). ``save_plan`` writes a new folder next to the target and
renames it into place: a failed or interrupted save leaves the old plan (or none), never half. Names inside ``tensors.npz``:

    placement/physical_to_logical     int [L, E], one ExpertPlacement per layer
    predictor/<kind>/<name>           predictor_state[kind]["arrays"][name]
    array/<name>                      Plan.arrays[name] (anything else a planner keeps)

Format versions: ``PLAN_FORMAT_VERSION`` loads as is; an older version loads only through a
migration in ``_MIGRATIONS`` (none exist: version 1 had no header checksum, so its header cannot
be verified and it is refused with the advice to re-run ``specmoe plan``); a newer version is
refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from megatron_specmoe.artifacts.errors import SpecMoEDataError
from megatron_specmoe.artifacts.files import atomic_folder, check_input_file
from megatron_specmoe.schedule.placement import ExpertPlacement

__all__ = [
    "PLAN_FORMAT",
    "PLAN_FORMAT_VERSION",
    "PLAN_HEADER_FILE",
    "PLAN_TENSORS_FILE",
    "PlanHeader",
    "Plan",
    "make_plan",
    "save_plan",
    "load_plan",
    "header_digest",
]

PathLike = Union[str, "os.PathLike[str]"]

PLAN_FORMAT = "specmoe-plan"
PLAN_FORMAT_VERSION = 2  # 2: plan.json carries header_sha256
PLAN_HEADER_FILE = "plan.json"
PLAN_TENSORS_FILE = "tensors.npz"
_PLACEMENT_KEY = "placement/physical_to_logical"
_HEADER_SHA = "header_sha256"
_RERUN = "re-run `specmoe plan` to make a new plan"

# Older format version v -> function turning a v header (parsed plan.json) and its arrays into
# version v + 1. Empty: version 1 is the first released format.
_MIGRATIONS: dict[int, Callable[[dict, dict[str, np.ndarray]], tuple[dict, dict[str, np.ndarray]]]] = {}


def _created_by() -> str:
    from megatron_specmoe import __version__

    return f"megatron_specmoe {__version__}"


def _check_json_exact(value: object, what: str) -> None:
    """Raise unless ``value`` survives a JSON round trip unchanged (no tuples, int keys, NaN)."""
    try:
        back = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serialisable: {exc}") from None
    if back != value:
        raise ValueError(
            f"{what} does not survive a JSON round trip unchanged (tuples become lists, non-str "
            "keys become str); use lists, str keys, and plain int/float/str/bool/None"
        )


def _positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"PlanHeader.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class PlanHeader:
    """What a plan was made for, and by what.

    Attributes:
        format_version: plan folder format version (``PLAN_FORMAT_VERSION`` when written now).
        created_by: "megatron_specmoe <version>" of the writer.
        num_layers: L, MoE layers of the model.
        num_experts: E, routed experts per MoE layer.
        topk: k, experts per token.
        ep_size: P, the EP size the placements were made for.
        hidden_size, vocab_size: optional model sizes (checked when both sides know them).
        predictor_kinds: the predictor kinds stored, in order (keys of Plan.predictor_state).
        checksum: sha256 hex of tensors.npz; "" for a plan that has not been saved.
        notes: free-form JSON-able dict (what it was fitted on, measures, commands).
    """

    format_version: int
    created_by: str
    num_layers: int
    num_experts: int
    topk: int
    ep_size: int
    hidden_size: Optional[int] = None
    vocab_size: Optional[int] = None
    predictor_kinds: tuple[str, ...] = ()
    checksum: str = ""
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("format_version", "num_layers", "num_experts", "topk", "ep_size"):
            _positive_int(getattr(self, name), name)
        for name in ("hidden_size", "vocab_size"):
            if getattr(self, name) is not None:
                _positive_int(getattr(self, name), name)
        if self.topk > self.num_experts:
            raise ValueError(f"PlanHeader.topk={self.topk} exceeds num_experts={self.num_experts}")
        if self.num_experts % self.ep_size:
            raise ValueError(f"PlanHeader.ep_size={self.ep_size} does not divide "
                             f"num_experts={self.num_experts}")
        object.__setattr__(self, "predictor_kinds", tuple(self.predictor_kinds))
        _check_json_exact(self.notes, "PlanHeader.notes")

    def to_json(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "format_version": self.format_version,
            "created_by": self.created_by,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "topk": self.topk,
            "ep_size": self.ep_size,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "predictor_kinds": list(self.predictor_kinds),
            "checksum": self.checksum,
            "notes": self.notes,
        }

    @classmethod
    def from_json(cls, obj: dict, *, where: str) -> "PlanHeader":
        required = ("format_version", "created_by", "num_layers", "num_experts", "topk", "ep_size",
                    "checksum")
        missing = [k for k in required if k not in obj]
        if missing:
            raise ValueError(f"{where}: header lacks the field(s) {missing}; {_RERUN}")
        return cls(
            format_version=obj["format_version"],
            created_by=obj["created_by"],
            num_layers=obj["num_layers"],
            num_experts=obj["num_experts"],
            topk=obj["topk"],
            ep_size=obj["ep_size"],
            hidden_size=obj.get("hidden_size"),
            vocab_size=obj.get("vocab_size"),
            predictor_kinds=tuple(obj.get("predictor_kinds", ())),
            checksum=obj["checksum"],
            notes=obj.get("notes", {}),
        )


def _check_array(arr: object, what: str) -> None:
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(arr).__name__}")
    if arr.dtype.hasobject:
        raise ValueError(f"{what} has dtype {arr.dtype} holding Python objects; plans store no "
                         "pickles: use numeric arrays")


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A loaded (or about to be saved) plan.

    Attributes:
        header: PlanHeader.
        placements: one ExpertPlacement per MoE layer (length L, each with E experts and
            ep_size P). None means Megatron's contiguous placement for every layer.
        predictor_state: kind -> {"config": JSON-able dict, "arrays": {name: np.ndarray}}; the
            keys must equal ``header.predictor_kinds`` (same order). Kinds contain no "/".
        arrays: other named arrays (name -> np.ndarray) that belong to no one predictor.
        source: the folder it was loaded from / saved to, for messages.
    """

    header: PlanHeader
    placements: Optional[Sequence[ExpertPlacement]] = None
    predictor_state: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)
    source: str = "<memory>"

    def __post_init__(self) -> None:
        h = self.header
        if self.placements is None:
            placements = tuple(ExpertPlacement.contiguous(h.num_experts, h.ep_size)
                               for _ in range(h.num_layers))
        else:
            placements = tuple(self.placements)
        if len(placements) != h.num_layers:
            raise ValueError(f"Plan {self.source}: {len(placements)} placements for "
                             f"num_layers={h.num_layers}; give one per MoE layer (or None)")
        for layer, pl in enumerate(placements):
            if not isinstance(pl, ExpertPlacement):
                raise ValueError(f"Plan {self.source}: placements[{layer}] is a "
                                 f"{type(pl).__name__}, expected ExpertPlacement")
            pl.check_matches(num_experts=h.num_experts, ep_size=h.ep_size,
                             where=f"Plan {self.source}, layer {layer}")
        object.__setattr__(self, "placements", placements)
        if tuple(self.predictor_state) != h.predictor_kinds:
            raise ValueError(f"Plan {self.source}: predictor_state has kinds "
                             f"{list(self.predictor_state)} but header.predictor_kinds is "
                             f"{list(h.predictor_kinds)}; they must match in order")
        for kind, state in self.predictor_state.items():
            what = f"Plan {self.source}: predictor_state[{kind!r}]"
            if not isinstance(kind, str) or not kind or "/" in kind:
                raise ValueError(f"{what}: a kind must be a non-empty str without '/'")
            if not isinstance(state, dict) or set(state) != {"config", "arrays"}:
                raise ValueError(f"{what} must be a dict with exactly the keys 'config' and "
                                 f"'arrays', got {sorted(state) if isinstance(state, dict) else state!r}")
            if not isinstance(state["config"], dict):
                raise ValueError(f"{what}['config'] must be a dict")
            _check_json_exact(state["config"], f"{what}['config']")
            for name, arr in state["arrays"].items():
                if not isinstance(name, str) or not name:
                    raise ValueError(f"{what}: array names must be non-empty str, got {name!r}")
                _check_array(arr, f"{what}['arrays'][{name!r}]")
        for name, arr in self.arrays.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"Plan {self.source}: array names must be non-empty str, got {name!r}")
            _check_array(arr, f"Plan {self.source}: arrays[{name!r}]")

    def check_compatible(
        self,
        *,
        num_layers: int,
        num_experts: int,
        topk: int,
        ep_size: int,
        vocab_size: Optional[int] = None,
        hidden_size: Optional[int] = None,
    ) -> None:
        """Raise ValueError listing every field where this plan differs from the run.

        vocab_size and hidden_size are compared only when both the plan and the caller know them.
        """
        h = self.header
        model_fix = f"{_RERUN} from traces of this model"
        checks = [
            ("num_layers", h.num_layers, num_layers, model_fix + " (MoE layers)"),
            ("num_experts", h.num_experts, num_experts, model_fix),
            ("topk", h.topk, topk, model_fix),
            ("ep_size", h.ep_size, ep_size, f"{_RERUN} for ep_size={ep_size}"),
            ("vocab_size", h.vocab_size, vocab_size, model_fix + " and its tokenizer"),
            ("hidden_size", h.hidden_size, hidden_size, model_fix),
        ]
        problems = [
            f"{name}: the plan was made for {name}={planned} but the run has {name}={actual}; {fix}"
            for name, planned, actual, fix in checks
            if planned is not None and actual is not None and planned != actual
        ]
        if problems:
            raise ValueError(f"plan {self.source} does not fit this run:\n  " + "\n  ".join(problems))


def make_plan(
    *,
    num_layers: int,
    num_experts: int,
    topk: int,
    ep_size: int,
    hidden_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
    placements: Optional[Sequence[ExpertPlacement]] = None,
    predictor_state: Optional[dict] = None,
    arrays: Optional[dict] = None,
    notes: Optional[dict] = None,
) -> Plan:
    """A new, unsaved Plan at the current format version (predictor kinds from predictor_state)."""
    predictor_state = dict(predictor_state or {})
    header = PlanHeader(
        format_version=PLAN_FORMAT_VERSION,
        created_by=_created_by(),
        num_layers=num_layers,
        num_experts=num_experts,
        topk=topk,
        ep_size=ep_size,
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        predictor_kinds=tuple(predictor_state),
        notes=dict(notes or {}),
    )
    return Plan(header=header, placements=placements, predictor_state=predictor_state,
                arrays=dict(arrays or {}))


# ---- save / load ---------------------------------------------------------------------------------
def _npz_bytes(entries: dict[str, np.ndarray]) -> bytes:
    """A deterministic .npz (sorted names, fixed timestamps) so equal plans hash equal."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, entries[name], allow_pickle=False)
    return buf.getvalue()


def header_digest(doc: dict) -> str:
    """sha256 hex of the canonical JSON of a plan header ``doc`` without its ``header_sha256``."""
    body = {k: v for k, v in doc.items() if k != _HEADER_SHA}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_plan(plan: Plan, directory: PathLike) -> Plan:
    """Write ``plan`` as the folder ``directory`` (its parent must exist).

    The two plan files are written into a temporary sibling folder that then replaces
    ``directory``; files other than the plan's in an existing ``directory`` are carried over.
    Returns the plan as saved: header with format version, created_by and checksum filled in."""
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise SpecMoEDataError(f"{folder}: exists and is not a folder", "choose another plan folder")
    h = plan.header
    p2l = np.array([pl.physical_to_logical for pl in plan.placements], dtype=np.int64)
    entries: dict[str, np.ndarray] = {
        _PLACEMENT_KEY: p2l.astype(np.uint8 if h.num_experts <= 256 else np.int32)
    }
    for kind, state in plan.predictor_state.items():
        for name, arr in state["arrays"].items():
            entries[f"predictor/{kind}/{name}"] = arr
    for name, arr in plan.arrays.items():
        entries[f"array/{name}"] = arr
    data = _npz_bytes(entries)
    header = replace(h, format_version=PLAN_FORMAT_VERSION, created_by=_created_by(),
                     checksum=hashlib.sha256(data).hexdigest())
    doc = header.to_json()
    doc["predictors"] = {
        kind: {"config": state["config"], "arrays": list(state["arrays"])}
        for kind, state in plan.predictor_state.items()
    }
    doc["arrays"] = list(plan.arrays)
    doc[_HEADER_SHA] = header_digest(doc)
    with atomic_folder(folder) as tmp:
        (tmp / PLAN_TENSORS_FILE).write_bytes(data)
        (tmp / PLAN_HEADER_FILE).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        if folder.is_dir():
            for other in folder.iterdir():
                if other.name not in (PLAN_HEADER_FILE, PLAN_TENSORS_FILE):
                    os.replace(other, tmp / other.name)
    return replace(plan, header=header, source=str(folder))


def _read_header(folder: Path) -> dict:
    path = folder / PLAN_HEADER_FILE
    if not folder.is_dir():
        what = "is a file, not a plan folder" if folder.exists() else "no such plan folder"
        raise SpecMoEDataError(f"{folder}: {what}", "make one with `specmoe plan --out DIR`")
    if not path.exists():
        raise SpecMoEDataError(f"{path}: missing; {folder} is not a plan folder",
                               "make one with `specmoe plan --out DIR`")
    check_input_file(path, what="plan header", fix=_RERUN)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecMoEDataError(f"{path}: not UTF-8 text at byte {exc.start}", _RERUN) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecMoEDataError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: "
                               f"{exc.msg}; the file is truncated or corrupt", _RERUN) from None
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise SpecMoEDataError(f"{path}: format is {got!r}, expected {PLAN_FORMAT!r}; not a plan "
                               "header", "point --plan at a folder written by `specmoe plan`")
    return doc


def load_plan(directory: PathLike) -> Plan:
    """Load and verify a plan folder written by ``save_plan``.

    Checks, in order: plan.json parses and is a plan; its format version is current (or older
    with a migration; otherwise refused, as is a newer one); plan.json has the recorded
    header_sha256; tensors.npz has the recorded sha256; the arrays listed in plan.json are
    exactly those in tensors.npz; shapes and values fit the header. Raises ``SpecMoEDataError``."""
    folder = Path(directory)
    hpath = folder / PLAN_HEADER_FILE
    doc = _read_header(folder)
    version = doc.get("format_version")
    created_by = doc.get("created_by", "an unknown writer")
    if isinstance(version, bool) or not isinstance(version, int):
        raise SpecMoEDataError(f"{hpath}: format_version is {version!r}, expected an integer", _RERUN)
    if version > PLAN_FORMAT_VERSION:
        raise SpecMoEDataError(
            f"{hpath}: plan format version {version} (written by {created_by}) is newer than this "
            f"{_created_by()} reads (version {PLAN_FORMAT_VERSION})", f"upgrade megatron_specmoe, "
            f"or {_RERUN} with this version")
    if version < PLAN_FORMAT_VERSION and version not in _MIGRATIONS:
        raise SpecMoEDataError(
            f"{hpath}: plan format version {version} (written by {created_by}) is older than "
            f"version {PLAN_FORMAT_VERSION} that this {_created_by()} reads and cannot be "
            "migrated", _RERUN)
    if version == PLAN_FORMAT_VERSION and doc.get(_HEADER_SHA) != header_digest(doc):
        raise SpecMoEDataError(
            f"{hpath}: its sha256 is {header_digest(doc)[:16]}... but it records {_HEADER_SHA} "
            f"{str(doc.get(_HEADER_SHA))[:16]!r}...; the header was edited or corrupted after the "
            "plan was written", f"{_RERUN} (never edit plan.json by hand)")
    tpath = folder / PLAN_TENSORS_FILE
    if not tpath.exists():
        raise SpecMoEDataError(f"{tpath}: missing; the plan folder is incomplete", _RERUN)
    check_input_file(tpath, what="plan tensors", fix=_RERUN)
    data = tpath.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != doc.get("checksum"):
        raise SpecMoEDataError(
            f"{tpath}: sha256 is {digest} but {PLAN_HEADER_FILE} records "
            f"{str(doc.get('checksum'))[:16]!r}...; the tensors are corrupt or were changed after "
            "the plan was written", _RERUN)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        raise SpecMoEDataError(f"{tpath}: not a readable .npz ({exc})", _RERUN) from None
    while version < PLAN_FORMAT_VERSION:
        doc, arrays = _MIGRATIONS[version](doc, arrays)
        if doc.get("format_version") != version + 1:
            raise SpecMoEDataError(f"plan migration from version {version} did not produce version "
                                   f"{version + 1}: a bug in megatron_specmoe", _RERUN)
        version += 1
    try:
        return _plan_from_parts(doc, arrays, folder)
    except SpecMoEDataError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SpecMoEDataError(f"{folder}: inconsistent plan ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:200]})", _RERUN) from None


def _plan_from_parts(doc: dict, arrays: dict[str, np.ndarray], folder: Path) -> Plan:
    hpath, tpath = folder / PLAN_HEADER_FILE, folder / PLAN_TENSORS_FILE
    header = PlanHeader.from_json(doc, where=str(hpath))
    listed = doc.get("predictors", {})
    if list(listed) != list(header.predictor_kinds):
        raise ValueError(f"{hpath}: 'predictors' has kinds {list(listed)} but predictor_kinds is "
                         f"{list(header.predictor_kinds)}; the header is corrupt, {_RERUN}")
    expected = {_PLACEMENT_KEY}
    expected |= {f"predictor/{k}/{n}" for k, v in listed.items() for n in v.get("arrays", [])}
    expected |= {f"array/{n}" for n in doc.get("arrays", [])}
    if set(arrays) != expected:
        raise ValueError(
            f"{tpath}: holds arrays that {PLAN_HEADER_FILE} does not list "
            f"{sorted(set(arrays) - expected)} and lacks listed ones "
            f"{sorted(expected - set(arrays))}; the folder is inconsistent, {_RERUN}"
        )
    p2l = arrays[_PLACEMENT_KEY]
    if p2l.shape != (header.num_layers, header.num_experts):
        raise ValueError(f"{tpath}: {_PLACEMENT_KEY} has shape {p2l.shape}, expected "
                         f"(num_layers, num_experts) = {(header.num_layers, header.num_experts)}")
    if not np.issubdtype(p2l.dtype, np.integer):
        raise SpecMoEDataError(f"{tpath}: {_PLACEMENT_KEY} is stored as {p2l.dtype}, not integers",
                               _RERUN)
    placements = [ExpertPlacement(physical_to_logical=tuple(row.tolist()), ep_size=header.ep_size)
                  for row in p2l]
    predictor_state = {
        kind: {
            "config": v.get("config", {}),
            "arrays": {n: arrays[f"predictor/{kind}/{n}"] for n in v.get("arrays", [])},
        }
        for kind, v in listed.items()
    }
    extra = {n: arrays[f"array/{n}"] for n in doc.get("arrays", [])}
    return Plan(header=header, placements=placements, predictor_state=predictor_state,
                arrays=extra, source=str(folder))

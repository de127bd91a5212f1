"""The bad-input corpus's machinery (issue 18): good inputs, the bad ones made from them, and the
check every case runs. The cases themselves are tables in ``test_bad_inputs.py`` and
``test_bad_inputs_more.py``; docs/cli_errors.md states the contract they check:

- exit status: 2 for a flag (or its value, or a combination), 1 for an input file or folder;
- stderr: exactly one line ``specmoe <cmd>: error: <what> -- <fix>`` (``specmoe-launch: error:``
  for the launcher), matching the case's pattern, which names the file, field or flag; argparse's
  own errors keep argparse's form (a usage line, then ``specmoe <cmd>: error: argument ...``);
- no traceback;
- nothing half-written: no temporary file left anywhere under the case's folders, no output
  created where a later command would read it, and the good inputs unchanged.

Commands run in-process through ``main(argv)`` (fast: hundreds of cases in seconds); a few cases in
``test_bad_inputs_more.py`` run real subprocesses to prove the same end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from megatron_specmoe.artifacts.trace_io import write_trace
from megatron_specmoe.artifacts.traces import RoutingTrace

E, L, K, T = 8, 3, 2, 96  # the good traces: top-2 of 8 experts, 3 MoE layers, 96 tokens


@dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
        id: the case name (``finding N`` in it when it reproduces a finding of issue 18).
        argv: the command line; ``{d}`` is the case's own folder, ``{g}`` the good inputs' folder.
        code: the expected exit status.
        pattern: regex the error line must match (names the file / field / flag and the fix).
        setup: ``setup(d, g)`` makes the bad input in ``d`` before the command runs.
        absent: paths (with ``{d}``) that must not exist afterwards (outputs never half-made).
        entry: "specmoe" or "specmoe-launch".
        argparse: the error is argparse's own (usage line + "error: argument ...").
    """

    id: str
    argv: tuple[str, ...]
    code: int
    pattern: str
    setup: Optional[Callable[[Path, Path], None]] = None
    absent: tuple[str, ...] = ()
    entry: str = "specmoe"
    argparse: bool = False
    needs: tuple[str, ...] = field(default=())


# ---- good inputs --------------------------------------------------------------------------------
def good_routes(num_experts: int = E, tokens: int = T, seed: int = 0) -> np.ndarray:
    """int32 [T, L, k], distinct experts per route."""
    rng = np.random.default_rng(seed)
    out = np.empty((tokens, L, K), dtype=np.int32)
    for t in range(tokens):
        for layer in range(L):
            out[t, layer] = rng.permutation(num_experts)[:K]
    return out


def layer_major(routes: np.ndarray) -> dict:
    return {str(layer): routes[:, layer].tolist() for layer in range(routes.shape[1])}


def megatron_records(routes: np.ndarray, rank: int = 0) -> list[dict]:
    """Two decode steps of Megatron-Core router records for layers 1, 3 (halves of the tokens)."""
    recs = []
    half = routes.shape[0] // 2
    for step in range(2):
        rows = routes[step * half:(step + 1) * half]
        for i, layer in enumerate((1, 3)):
            recs.append({"step": step, "stage": "decode", "block": "decoder", "layer": layer,
                         "rank": rank, "num_tokens": int(rows.shape[0]), "topk": K,
                         "top_indices": rows[:, i].tolist()})
    return recs


def write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def make_good(g: Path) -> None:
    """The good inputs every case starts from, in folder ``g``."""
    from megatron_specmoe.artifacts.plan_folder import make_plan, save_plan
    from megatron_specmoe.cli.main import main
    from megatron_specmoe.predict.registry import fit_predictor

    routes = good_routes()
    tr = RoutingTrace(experts=routes, num_experts=E, token_ids=np.arange(T, dtype=np.int64) % 17)
    write_trace(tr, g / "good.npz")
    write_trace(RoutingTrace(experts=routes, num_experts=E), g / "noids.npz")
    (g / "good.json").write_text(json.dumps(layer_major(routes)))
    (g / "mega").mkdir()
    write_jsonl(g / "mega" / "router_trace_rank0.jsonl", megatron_records(routes))
    assert main(["plan", "--traces", str(g / "good.npz"), "--ep", "2", "--out", str(g / "plan"),
                 "--predictor", "layer", "--placement", "contiguous"]) == 0
    r16 = good_routes(16, seed=1)
    t16 = RoutingTrace(experts=r16, num_experts=16)
    pred = fit_predictor("layer", t16, n=1, min_count=1, alpha=1.0)
    save_plan(make_plan(num_layers=L, num_experts=16, topk=K, ep_size=2,
                        predictor_state={"layer": pred.to_state()}), g / "plan16")
    save_plan(make_plan(num_layers=L, num_experts=E, topk=K, ep_size=2), g / "plan_nopred")
    (g / "calib.txt").write_text("def f(x):\n    return x + 1\n")


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (the good inputs must not change)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---- making bad files -----------------------------------------------------------------------------
def text(name: str, content: str) -> Callable[[Path, Path], None]:
    return lambda d, g: (d / name).write_text(content)


def raw(name: str, content: bytes) -> Callable[[Path, Path], None]:
    return lambda d, g: (d / name).write_bytes(content)


def fifo(name: str) -> Callable[[Path, Path], None]:
    return lambda d, g: os.mkfifo(d / name)


def subdir(name: str) -> Callable[[Path, Path], None]:
    return lambda d, g: (d / name).mkdir()


def json_trace(name: str, edit: Callable[[dict], object]) -> Callable[[Path, Path], None]:
    """A layer-major JSON trace: the good one after ``edit(obj)`` (which may return a new obj)."""
    def make(d: Path, g: Path) -> None:
        obj = layer_major(good_routes())
        new = edit(obj)
        (d / name).write_text(json.dumps(new if isinstance(new, dict) else obj))
    return make


def jsonl_trace(edit: Callable[[list], object]) -> Callable[[Path, Path], None]:
    """d/router_trace_rank0.jsonl: the good records after ``edit(records)``."""
    def make(d: Path, g: Path) -> None:
        recs = megatron_records(good_routes())
        new = edit(recs)
        write_jsonl(d / "router_trace_rank0.jsonl", recs if new is None else new)
    return make


def npz_trace(name: str, edit: Callable[[dict, dict], None]) -> Callable[[Path, Path], None]:
    """A specmoe .npz trace whose header / arrays went through ``edit(header, arrays)``."""
    def make(d: Path, g: Path) -> None:
        with np.load(g / "good.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        header = json.loads(arrays.pop("header").tobytes().decode())
        edit(header, arrays)
        for k, v in arrays.items():
            if k in header.get("fields", {}) and isinstance(v, np.ndarray):
                header["fields"][k] = {"dtype": v.dtype.str, "shape": list(v.shape)}
        blob = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        with open(d / name, "wb") as f:
            np.savez(f, header=blob, **arrays)
    return make


def plan_copy(edit: Optional[Callable[[Path], None]] = None, src: str = "plan"):
    """d/plan: a copy of a good plan folder, then ``edit(folder)``."""
    def make(d: Path, g: Path) -> None:
        dst = d / "plan"
        dst.mkdir()
        for f in (g / src).iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        if edit is not None:
            edit(dst)
    return make


def edit_header(change: Callable[[dict], None], *, seal: bool) -> Callable[[Path], None]:
    """Edit plan.json; ``seal``: recompute header_sha256 (to reach the checks behind it)."""
    def make(folder: Path) -> None:
        from megatron_specmoe.artifacts.plan_folder import header_digest

        doc = json.loads((folder / "plan.json").read_text())
        change(doc)
        if seal:
            doc["header_sha256"] = header_digest(doc)
        (folder / "plan.json").write_text(json.dumps(doc, indent=1))
    return make


def zip_of(name: str, members: dict[str, bytes]) -> Callable[[Path, Path], None]:
    def make(d: Path, g: Path) -> None:
        with zipfile.ZipFile(d / name, "w") as zf:
            for k, v in members.items():
                zf.writestr(k, v)
    return make


def both(*steps: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    def make(d: Path, g: Path) -> None:
        for s in steps:
            s(d, g)
    return make


# ---- the check --------------------------------------------------------------------------------
_TEMP = re.compile(r"\.tmp-\d+$|\.old-\d+$|\.tmp$")


def check_result(case: Case, code: int, err: str, d: Path, g: Path, before: dict) -> None:
    prog = "specmoe-launch" if case.entry == "specmoe-launch" else f"specmoe {case.argv[0]}"
    assert "Traceback" not in err, f"{case.id}: a traceback:\n{err}"
    assert code == case.code, f"{case.id}: exit {code}, expected {case.code}; stderr:\n{err}"
    lines = [x for x in err.splitlines() if " error: " in x or x.startswith(f"{prog}: error")]
    assert len(lines) == 1, f"{case.id}: expected one error line, got:\n{err}"
    line = lines[0]
    assert line.startswith(f"{prog}: error: "), f"{case.id}: {line!r}"
    if case.argparse:
        assert err.lstrip().startswith("usage:"), f"{case.id}: {err}"
    else:
        assert " -- " in line, f"{case.id}: no fix after ' -- ': {line!r}"
        assert len(err.strip().splitlines()) == len([x for x in err.strip().splitlines() if x.startswith(("[", "simulate:"))]) + 1, \
            f"{case.id}: lines besides the error and progress:\n{err}"
    assert re.search(case.pattern, line), f"{case.id}: {line!r} does not match {case.pattern!r}"
    for folder in (d, g):
        left = [str(p) for p in folder.rglob("*") if _TEMP.search(p.name)]
        assert not left, f"{case.id}: temporary files left: {left}"
    for path in case.absent:
        assert not Path(path.format(d=d, g=g)).exists(), f"{case.id}: {path} was created"
    assert snapshot(g) == before, f"{case.id}: the good inputs changed"

"""Read and write routing traces (deduplication and cross-domain splits: ``trace_splits.py``).

Notation
    T: tokens.   L: MoE layers (traced).   k: top-k.   E: routed experts per layer.

Formats (``TraceFormat``)
    layer-major-json   One JSON object ``{"0": [[e1, e2], ...], ..., "L-1": [...]}``: one key per
                       layer, numbered 0 .. L-1 without gaps; each value lists, per token, that
                       token's k experts. Token i of every layer is the same token. This is the
                       format of the Mixtral-8x7B MT-Bench traces (HD-MoE ``expert_trace``).
    megatron-jsonl     Megatron-Core's router trace (``--moe-routing-trace-path``, core >= 0.19;
                       ``megatron/core/transformer/moe/router_trace.py``): one file per rank,
                       ``router_trace_rank{rank}.jsonl``, one JSON record per line with the fields
                       step, stage, block, layer, rank, num_tokens, topk, top_indices
                       ([num_tokens][topk]), and optionally mtp_idx and sidecar offsets
                       (hs_*, logit_*; the sidecars are not read here). core 0.16 has no tracer.
    specmoe-npz        Ours: a numpy ``.npz`` (zip, no pickles) holding ``header`` (uint8 bytes of
                       a JSON object: format name, version, num_experts, shapes and dtypes) and
                       one array per field (experts in the smallest unsigned int type that holds
                       E - 1; optional token_ids, positions, request_ids, probs).

Every reader returns a ``RoutingTrace`` and raises ``SpecMoEDataError`` (a ``ValueError``) naming
the file, what is wrong and where, and what to do; nothing is dropped or guessed without saying
so. The checks are ``trace_checks.py``'s: E is never guessed (the JSON formats need
``num_experts``), ids are integers in 0..E-1, a route's k experts are distinct. Only regular files
are read (a FIFO or ``/dev/zero`` is refused before it is opened).
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence, Union, get_args

import numpy as np

from megatron_specmoe.artifacts.errors import SpecMoEDataError, SpecMoEUsageError
from megatron_specmoe.artifacts.files import atomic_file, check_input_file
from megatron_specmoe.artifacts.trace_checks import (
    check_num_experts,
    check_routes,
    int_field,
    int_matrix,
    json_error,
    need_num_experts,
)
from megatron_specmoe.artifacts.traces import RoutingTrace

# Deduplication and cross-domain splits (trace_splits.py) are part of this module's API.
from megatron_specmoe.artifacts.trace_splits import TraceSplit, cross_domain_split, dedup_routes, leave_one_out_splits

__all__ = [
    "TraceFormat",
    "TRACE_NPZ_FORMAT",
    "TRACE_NPZ_VERSION",
    "read_layer_major_json",
    "read_megatron_jsonl",
    "write_trace",
    "read_trace",
    "detect_format",
    "read_traces",
    "dedup_routes",
    "TraceSplit",
    "cross_domain_split",
    "leave_one_out_splits",
]

PathLike = Union[str, "os.PathLike[str]"]
TraceFormat = Literal["layer-major-json", "megatron-jsonl", "specmoe-npz"]

TRACE_NPZ_FORMAT = "specmoe-trace"
TRACE_NPZ_VERSION = 1
_OPTIONAL_FIELDS = ("token_ids", "positions", "request_ids", "probs")


# ---- small helpers --------------------------------------------------------------------------------
def _smallest_uint(max_value: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def _smallest_int(arr: np.ndarray) -> np.dtype:
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo >= 0:
        return _smallest_uint(hi)
    for dt in (np.int8, np.int16, np.int32):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


# ---- layer-major JSON -------------------------------------------------------------------------
def read_layer_major_json(path: PathLike, *, num_experts: Optional[int] = None) -> RoutingTrace:
    """Read a layer-major JSON trace (see the module docstring).

    Args:
        path: the ``.json`` file.
        num_experts: E (required: the format does not record it); every id is checked against it.

    Returns:
        RoutingTrace with experts int32 [T, L, k] in file order; no token ids (the format has none).
    """
    e = need_num_experts(num_experts, path, "layer-major JSON")
    check_input_file(path, what="trace")
    try:
        with open(path, "rb") as f:
            obj = json.load(f)
    except json.JSONDecodeError as exc:
        raise json_error(path, exc) from None
    except UnicodeDecodeError as exc:
        raise SpecMoEDataError(f"{path}: not UTF-8 text at byte {exc.start}",
                               "give a JSON trace (or a .npz / .jsonl one)") from None
    except RecursionError:
        raise SpecMoEDataError(f"{path}: JSON nested too deeply", "re-export the trace") from None
    if not isinstance(obj, dict):
        raise SpecMoEDataError(f"{path}: expected a JSON object keyed by layer number, got "
                               f"{type(obj).__name__}", 'a layer-major trace is {"0": [[e, ...], ...], ...}')
    if not obj:
        raise SpecMoEDataError(f"{path}: the JSON object has no layer keys",
                               'expected keys "0".."L-1", one per MoE layer')
    layer_of: dict[int, str] = {}
    for key in obj:
        try:
            num = int(key)
        except ValueError:
            raise SpecMoEDataError(f"{path}: key {key!r} is not a layer number",
                                   'expected keys "0".."L-1", one per MoE layer') from None
        layer_of[num] = key
    nums = sorted(layer_of)
    if nums != list(range(len(nums))):
        missing = sorted(set(range(max(nums) + 1)) - set(nums))
        raise SpecMoEDataError(
            f"{path}: layer keys are not contiguous from 0: found {nums[0]}..{nums[-1]} "
            f"({len(nums)} keys), missing {missing[:10]}{'...' if len(missing) > 10 else ''}",
            'expected keys "0".."L-1" without gaps; re-export the trace')
    per_layer = []
    topk: Optional[int] = None
    for layer in nums:
        mat = int_matrix(obj[layer_of[layer]], path=path, what=f"layer {layer}", topk=topk,
                         num_experts=e)
        topk = mat.shape[1] if mat.shape[0] else topk
        if per_layer and mat.shape[0] != per_layer[0].shape[0]:
            raise SpecMoEDataError(
                f"{path}: layer {layer} has {mat.shape[0]} tokens but layer 0 has "
                f"{per_layer[0].shape[0]}", "layers must have equal length (a truncated export?); "
                "re-export the trace")
        per_layer.append(mat)
    experts = np.stack(per_layer, axis=1)  # [T, L, k], ids checked by int_matrix
    return RoutingTrace(experts=experts.astype(np.int32), num_experts=e, source=str(path))


def _lines(fh, path: str):
    """(line number, text) of a text file, with a located error for bytes that are not UTF-8."""
    lineno = 0
    try:
        for lineno, line in enumerate(fh, start=1):
            yield lineno, line
    except UnicodeDecodeError:
        raise SpecMoEDataError(f"{path}: not UTF-8 text after line {lineno}",
                               "give Megatron-Core's router_trace_rank*.jsonl files") from None


# ---- Megatron-Core router trace (JSONL) ---------------------------------------------------------
_MEGATRON_REQUIRED = ("step", "layer", "rank", "num_tokens", "topk", "top_indices")


def read_megatron_jsonl(
    paths: Union[PathLike, Sequence[PathLike]],
    *,
    num_experts: Optional[int] = None,
    ranks: Optional[Sequence[int]] = None,
    progress: bool = False,
) -> RoutingTrace:
    """Read Megatron-Core router-trace JSONL files (one per rank) into one trace.

    Token order: records are grouped by (step, rank); groups come in ascending step, then
    ascending rank. Within a group, the j-th record of each layer is the j-th forward pass of that
    rank in that step (one per step in inference; one per micro-batch, in file order, in training)
    and its tokens follow in the record's own order. So token t of the result is
    (step, rank, pass j, row i), and its route is row i of pass j at every traced layer.

    Only decoder records are read; multi-token-prediction records (block "mtp") are skipped and
    counted in a stderr line.

    Layers: the L axis is the distinct decoder ``layer`` numbers, ascending (the MoE
    layers; dense layers have no router and do not appear). Megatron's ``layer`` is the index in
    the rank's ``decoder.layers`` list, which is local to a pipeline stage: read PP = 1 traces,
    or one pipeline stage at a time via ``ranks``. With TP > 1 and no sequence parallelism every
    TP rank routes the same tokens; pass one rank per TP group in ``ranks`` to avoid duplicates.

    Args:
        paths: one ``router_trace_rank{r}.jsonl`` or several (any order; the rank field decides).
        num_experts: E (required: the tracer does not record it); every id is checked against it.
        ranks: read only records of these ranks (None: all); the others are counted on stderr.
        progress: print a line per file to stderr.

    Returns:
        RoutingTrace with experts int32 [T, L, k]; no token ids (the tracer records none).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise SpecMoEUsageError("read_megatron_jsonl: no files given", "pass router_trace_rank*.jsonl files")
    e = need_num_experts(num_experts, paths[0], "Megatron router-trace JSONL")
    keep_ranks = None if ranks is None else {int(r) for r in ranks}
    # (step, rank) -> layer -> list of (path, line, int64 [n, k])
    groups: dict[tuple[int, int], dict[int, list[tuple[str, int, np.ndarray]]]] = {}
    owner: dict[tuple[int, int, int], str] = {}
    skipped_block = skipped_rank = 0
    topk: Optional[int] = None
    topk_where = ""
    for path in paths:
        path = str(path)
        if progress:
            print(f"[trace_io] reading {path}", file=sys.stderr)
        check_input_file(path, what="Megatron router trace")
        with open(path, "r", encoding="utf-8", errors="strict") as fh:
            for lineno, line in _lines(fh, path):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise json_error(path, exc, line=lineno) from None
                where = f"{path}: line {lineno}"
                if not isinstance(rec, dict):
                    raise SpecMoEDataError(f"{where}: expected a JSON object (one router record)",
                                           "give Megatron-Core's router_trace_rank*.jsonl files")
                missing = [k for k in _MEGATRON_REQUIRED if k not in rec]
                if missing:
                    raise SpecMoEDataError(
                        f"{where}: record lacks the field(s) {missing}",
                        f"Megatron-Core router-trace records have {list(_MEGATRON_REQUIRED)}; "
                        "re-export the trace")
                if rec.get("block", "decoder") != "decoder":
                    skipped_block += 1
                    continue
                rank, step, layer = (int_field(rec, n, where) for n in ("rank", "step", "layer"))
                if keep_ranks is not None and rank not in keep_ranks:
                    skipped_rank += 1
                    continue
                rec_k = int_field(rec, "topk", where)
                if topk is None:
                    topk, topk_where = rec_k, where
                elif rec_k != topk:
                    raise SpecMoEDataError(f"{where}: topk={rec_k} but {topk_where} has topk={topk}",
                                           "a trace has one top-k for all layers and tokens; read "
                                           "each model's files separately")
                mat = int_matrix(rec["top_indices"], path=path,
                                 what=f"line {lineno} (step {step}, rank {rank}, layer {layer})",
                                 topk=rec_k, num_experts=e)
                if mat.shape[0] != int_field(rec, "num_tokens", where):
                    raise SpecMoEDataError(
                        f"{where}: num_tokens={rec['num_tokens']} but top_indices has "
                        f"{mat.shape[0]} rows", "the record is truncated; re-export the trace")
                key = (step, rank, layer)
                if owner.setdefault(key, path) != path:
                    raise SpecMoEDataError(
                        f"{where}: step {step}, rank {rank}, layer {layer} also appears in "
                        f"{owner[key]}", "the files are from different runs or one was given twice; "
                        "read each run separately and concatenate")
                groups.setdefault((step, rank), {}).setdefault(layer, []).append((path, lineno, mat))
    if skipped_block or skipped_rank:
        print(f"[trace_io] read_megatron_jsonl: skipped {skipped_block} record(s) of blocks other "
              f"than 'decoder' and {skipped_rank} of ranks not in {sorted(keep_ranks or [])}",
              file=sys.stderr)
    if not groups:
        raise SpecMoEDataError(f"{', '.join(map(str, paths))}: no decoder router records"
                               + (f" of ranks {sorted(keep_ranks)}" if keep_ranks is not None else ""),
                               "trace a run with --moe-routing-trace-path (core >= 0.19)")
    layers = sorted({layer for g in groups.values() for layer in g})
    pieces = []
    for (step, rank) in sorted(groups):
        g = groups[(step, rank)]
        absent = [layer for layer in layers if layer not in g]
        if absent:
            path, lineno, _ = next(iter(g.values()))[0]
            raise SpecMoEDataError(
                f"{path}: step {step}, rank {rank} has no records for layer(s) {absent} "
                f"(traced layers: {layers})", "the trace is truncated (e.g. max_steps hit "
                "mid-step); drop that step's records or re-trace")
        passes = {layer: len(g[layer]) for layer in layers}
        if len(set(passes.values())) != 1:
            path = g[layers[0]][0][0]
            raise SpecMoEDataError(
                f"{path}: step {step}, rank {rank}: layers fired an unequal number of times "
                f"{passes}", "tokens cannot be paired across layers; re-trace the run")
        for j in range(passes[layers[0]]):
            mats = [g[layer][j][2] for layer in layers]
            sizes = {m.shape[0] for m in mats}
            if len(sizes) != 1:
                counts = {layer: g[layer][j][2].shape[0] for layer in layers}
                raise SpecMoEDataError(
                    f"{g[layers[0]][j][0]}: step {step}, rank {rank}, pass {j}: layers have "
                    f"unequal num_tokens {counts}", "tokens cannot be paired across layers; "
                    "re-trace the run")
            pieces.append(np.stack(mats, axis=1))
    experts = np.concatenate(pieces) if pieces else np.zeros((0, len(layers), topk or 1), np.int64)
    source = "+".join(str(p) for p in paths)
    if progress:
        print(f"[trace_io] megatron trace: {experts.shape[0]} tokens, layers {layers}, "
              f"top-{topk}, E={e}", file=sys.stderr)
    return RoutingTrace(experts=experts.astype(np.int32), num_experts=e, source=source)


# ---- our compact format -------------------------------------------------------------------------
def write_trace(trace: RoutingTrace, path: PathLike) -> None:
    """Write ``trace`` as a specmoe-npz file at exactly ``path`` (no suffix is added).

    Experts are stored in the smallest unsigned type holding E - 1, integer fields in the smallest
    type holding their range, probs as float32. Read back with ``read_trace``."""
    e_dtype = _smallest_uint(trace.num_experts - 1)
    arrays: dict[str, np.ndarray] = {"experts": trace.experts.astype(e_dtype)}
    for name in _OPTIONAL_FIELDS:
        value = getattr(trace, name)
        if value is None:
            continue
        arrays[name] = value.astype(np.float32 if name == "probs" else _smallest_int(value))
    header = {
        "format": TRACE_NPZ_FORMAT,
        "version": TRACE_NPZ_VERSION,
        "num_experts": trace.num_experts,
        "num_tokens": trace.num_tokens,
        "num_layers": trace.num_layers,
        "topk": trace.topk,
        "source": trace.source,
        "fields": {k: {"dtype": v.dtype.str, "shape": list(v.shape)} for k, v in arrays.items()},
    }
    hbytes = np.frombuffer(json.dumps(header, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, header=hbytes, **arrays)


_NPZ_FIX = "the file is corrupt; re-export it (write_trace / --specmoe-record-routes)"


def _npz_header(path: PathLike, data: dict) -> dict:
    if "header" not in data:
        raise SpecMoEDataError(f"{path}: .npz has no 'header' entry (entries: {sorted(data)[:8]}); "
                               f"not a {TRACE_NPZ_FORMAT} file", "write traces with write_trace")
    try:
        header = json.loads(data.pop("header").tobytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpecMoEDataError(f"{path}: header is not valid JSON ({exc})", _NPZ_FIX) from None
    if not isinstance(header, dict) or header.get("format") != TRACE_NPZ_FORMAT:
        got = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise SpecMoEDataError(f"{path}: header format is {got!r}, expected {TRACE_NPZ_FORMAT!r}",
                               "write traces with write_trace")
    version = header.get("version")
    if version != TRACE_NPZ_VERSION:
        raise SpecMoEDataError(
            f"{path}: trace format version {version!r} is not supported (this megatron_specmoe "
            f"reads version {TRACE_NPZ_VERSION})", "re-export the trace with this version")
    for key in ("num_experts", "num_tokens", "num_layers", "topk", "fields"):
        if key not in header:
            raise SpecMoEDataError(f"{path}: header lacks the key {key!r}", _NPZ_FIX)
        if key != "fields" and (isinstance(header[key], bool) or not isinstance(header[key], int)
                                or header[key] < 0):
            raise SpecMoEDataError(f"{path}: header {key}={header[key]!r} is not a count", _NPZ_FIX)
    try:
        check_num_experts(header["num_experts"], flag="header num_experts")
    except SpecMoEUsageError as exc:
        raise SpecMoEDataError(f"{path}: {exc.what}", _NPZ_FIX) from None
    if not isinstance(header["fields"], dict) or not all(
            isinstance(v, dict) and {"dtype", "shape"} <= set(v) for v in header["fields"].values()):
        raise SpecMoEDataError(f"{path}: header 'fields' is not a map of field -> dtype/shape", _NPZ_FIX)
    return header


def read_trace(path: PathLike) -> RoutingTrace:
    """Read a specmoe-npz trace written by ``write_trace``; checks header, shapes, dtypes and ids."""
    check_input_file(path, what="trace")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        raise SpecMoEDataError(f"{path}: not a readable .npz trace ({type(exc).__name__}: "
                               f"{str(exc)[:80]})", "the file is truncated or corrupt; re-export "
                               "it") from None
    header = _npz_header(path, data)
    fields = header["fields"]
    if set(fields) != set(data):
        raise SpecMoEDataError(f"{path}: header lists fields {sorted(fields)} but the file holds "
                               f"{sorted(data)}", _NPZ_FIX)
    if "experts" not in data:
        raise SpecMoEDataError(f"{path}: no 'experts' array", _NPZ_FIX)
    expect_tlk = [header["num_tokens"], header["num_layers"], header["topk"]]
    for name, arr in data.items():
        want = fields[name]
        if list(arr.shape) != want["shape"] or arr.dtype.str != want["dtype"]:
            raise SpecMoEDataError(f"{path}: field {name!r} has shape {list(arr.shape)} dtype "
                                   f"{arr.dtype.str}, header says {want['shape']} {want['dtype']}",
                                   _NPZ_FIX)
        shape = expect_tlk if name in ("experts", "probs") else expect_tlk[:1]
        if list(arr.shape) != shape:
            raise SpecMoEDataError(f"{path}: field {name!r} has shape {list(arr.shape)}, expected "
                                   f"{shape} from the header's num_tokens/num_layers/topk", _NPZ_FIX)
        if name != "probs" and not np.issubdtype(arr.dtype, np.integer):
            raise SpecMoEDataError(f"{path}: field {name!r} is stored as {arr.dtype}, not integers "
                                   "(1.7 would be read as 1)", f"store {name} as an integer array")
    e = int(header["num_experts"])
    check_routes(data["experts"], e, path=path, locate=lambda b: f"token {b[0]}, layer {b[1]}")
    return RoutingTrace(
        experts=data["experts"].astype(np.int32),
        num_experts=e,
        source=str(path),
        **{name: data.get(name) for name in _OPTIONAL_FIELDS},
    )


# ---- dispatch --------------------------------------------------------------------------------------
def detect_format(path: PathLike) -> TraceFormat:
    """Format of one file: by suffix (.npz, .jsonl, .json), else by its first bytes."""
    check_input_file(path, what="trace")
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        return "specmoe-npz"
    if suffix == ".jsonl":
        return "megatron-jsonl"
    if suffix == ".json":
        return "layer-major-json"
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise SpecMoEDataError(f"{path}: cannot open trace: {exc.strerror}", "check the path") from None
    if head.startswith(b"PK"):
        return "specmoe-npz"
    text = head.lstrip()
    if text.startswith(b"{"):
        first_line = text.split(b"\n", 1)[0]
        return "megatron-jsonl" if b'"top_indices"' in first_line or b'"num_tokens"' in first_line \
            else "layer-major-json"
    raise SpecMoEDataError(f"{path}: cannot tell the trace format (suffix {suffix!r}, starts with "
                           f"{head[:16]!r})", "give a .json, .jsonl or .npz trace (or pass fmt= "
                           f"one of {list(get_args(TraceFormat))})")


def _expand(paths: Union[PathLike, Sequence[PathLike]]) -> list[str]:
    """Files, with a directory standing for its router_trace_rank*.jsonl files and its *.npz
    traces (e.g. the ``routes-rank*-part*.npz`` of ``--specmoe-record-routes``), in name order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(str(q) for q in Path(p).glob("router_trace_rank*.jsonl"))
            found += sorted(str(q) for q in Path(p).glob("*.npz"))
            if not found:
                raise SpecMoEDataError(f"{p}: directory holds no router_trace_rank*.jsonl files "
                                       "and no *.npz traces", "point --traces at the files or "
                                       "the folder the recorder wrote")
            out.extend(found)
        else:
            check_input_file(p, what="trace")
            out.append(str(p))
    if not out:
        raise SpecMoEUsageError("read_traces: no trace files given", "pass --traces FILE...")
    return out


def read_traces(
    paths: Union[PathLike, Sequence[PathLike]],
    fmt: Union[TraceFormat, Literal["auto"]] = "auto",
    *,
    num_experts: Optional[int] = None,
) -> RoutingTrace:
    """Read one or more trace files into one RoutingTrace (tokens concatenated in path order).

    A directory stands for the ``router_trace_rank*.jsonl`` and ``*.npz`` files in it. All Megatron JSONL files
    are merged in one ``read_megatron_jsonl`` call (ranks belong together), placed where the first
    of them appears; other files are read one by one. ``fmt="auto"`` detects each file's format.
    ``num_experts`` is required for the JSON formats (they do not record E); a ``.npz`` records it,
    and must agree with ``num_experts`` when that is given, and with the other files."""
    num_experts = check_num_experts(num_experts)
    files = _expand(paths)
    allowed = get_args(TraceFormat)
    if fmt != "auto" and fmt not in allowed:
        raise SpecMoEUsageError(f"read_traces: unknown fmt {fmt!r}",
                                f"use 'auto' or one of {list(allowed)}")
    formats = [detect_format(p) if fmt == "auto" else fmt for p in files]
    readers: dict[str, Callable[[str], RoutingTrace]] = {
        "layer-major-json": lambda p: read_layer_major_json(p, num_experts=num_experts),
        "specmoe-npz": read_trace,
    }
    assert set(readers) | {"megatron-jsonl"} == set(allowed)
    traces: list[RoutingTrace] = []
    megatron = [p for p, f in zip(files, formats) if f == "megatron-jsonl"]
    for p, f in zip(files, formats):
        if f == "megatron-jsonl":
            if p == megatron[0]:
                traces.append(read_megatron_jsonl(megatron, num_experts=num_experts))
        else:
            traces.append(readers[f](p))
    if num_experts is None and len({t.num_experts for t in traces}) > 1:
        raise SpecMoEDataError(f"{', '.join(t.source for t in traces)}: the files record different "
                               f"numbers of experts {[t.num_experts for t in traces]}",
                               "read one model's traces at a time")
    if num_experts is not None:
        for t in traces:
            if t.num_experts != num_experts:
                raise SpecMoEDataError(f"{t.source}: the file records num_experts={t.num_experts} "
                                       f"but {num_experts} was given (--num-experts or the plan)",
                                       "use traces and a plan of the same model")
    return traces[0] if len(traces) == 1 else RoutingTrace.concat(traces)

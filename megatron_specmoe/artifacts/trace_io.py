"""Read and write routing traces; deduplicate them; split them by file for cross-domain checks.

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

Every reader returns a ``RoutingTrace`` and raises ``ValueError`` naming the file and what is
wrong (and where); nothing is dropped or guessed without saying so.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence, Union, get_args

import numpy as np

from megatron_specmoe.artifacts.traces import RoutingTrace

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
def _json_error(path: PathLike, exc: json.JSONDecodeError, line: Optional[int] = None) -> ValueError:
    where = f"line {line}, column {exc.colno}" if line is not None else (
        f"line {exc.lineno}, column {exc.colno} (char {exc.pos})"
    )
    return ValueError(
        f"{path}: not valid JSON at {where}: {exc.msg}; the file is truncated or corrupt "
        "(re-export it)"
    )


def _int_matrix(rows: object, *, path: PathLike, what: str, topk: Optional[int]) -> np.ndarray:
    """int64 [n, k] from a JSON list of per-token expert lists, with located errors.

    ``topk`` is the expected k (None: take it from the first row)."""
    if not isinstance(rows, list):
        raise ValueError(f"{path}: {what} should be a list of per-token expert lists, got "
                         f"{type(rows).__name__}")
    for t, row in enumerate(rows):
        if not isinstance(row, list):
            raise ValueError(f"{path}: {what}, token {t}: expected a list of expert ids, got {row!r}")
        if topk is None:
            topk = len(row)
        if len(row) != topk:
            raise ValueError(
                f"{path}: {what}, token {t}: has {len(row)} experts but top-k is {topk} "
                "(from the first token / layer); every token must list the same number"
            )
        for e in row:
            if isinstance(e, bool) or not isinstance(e, int):
                raise ValueError(f"{path}: {what}, token {t}: expert id {e!r} is not an integer")
    if topk == 0:
        raise ValueError(f"{path}: {what}: top-k is 0 (tokens list no experts)")
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), topk if topk is not None else 0)


def _resolve_num_experts(
    experts: np.ndarray, num_experts: Optional[int], *, path: PathLike, locate: Callable[[tuple], str]
) -> int:
    """Check ids against ``num_experts`` (or infer max + 1) and return E."""
    if experts.size and experts.min() < 0:
        bad = tuple(np.argwhere(experts < 0)[0])
        raise ValueError(f"{path}: negative expert id {int(experts[bad])} at {locate(bad)}")
    if num_experts is None:
        if not experts.size:
            raise ValueError(f"{path}: no routes in the file and num_experts not given")
        return int(experts.max()) + 1
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if experts.size and experts.max() >= num_experts:
        bad = tuple(np.argwhere(experts >= num_experts)[0])
        raise ValueError(
            f"{path}: expert id {int(experts[bad])} at {locate(bad)} is out of range "
            f"0..{num_experts - 1} (num_experts={num_experts}); pass the model's num_experts"
        )
    return int(num_experts)


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
        num_experts: E. If given, every id is checked against it; if None it is inferred as the
            largest id + 1 (an expert that no token chose would be missed: pass E when known).

    Returns:
        RoutingTrace with experts int32 [T, L, k] in file order; no token ids (the format has none).
    """
    try:
        with open(path, "rb") as f:
            obj = json.load(f)
    except json.JSONDecodeError as exc:
        raise _json_error(path, exc) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text at byte {exc.start}; is it a JSON trace?") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object keyed by layer number, got "
                         f"{type(obj).__name__}")
    if not obj:
        raise ValueError(f"{path}: the JSON object has no layer keys; expected keys \"0\"..\"L-1\"")
    layer_of: dict[int, str] = {}
    for key in obj:
        try:
            num = int(key)
        except ValueError:
            raise ValueError(
                f"{path}: key {key!r} is not a layer number; expected keys \"0\"..\"L-1\""
            ) from None
        layer_of[num] = key
    nums = sorted(layer_of)
    if nums != list(range(len(nums))):
        missing = sorted(set(range(max(nums) + 1)) - set(nums))
        raise ValueError(
            f"{path}: layer keys are not contiguous from 0: found {nums[0]}..{nums[-1]} "
            f"({len(nums)} keys), missing {missing[:10]}{'...' if len(missing) > 10 else ''}"
        )
    per_layer = []
    topk: Optional[int] = None
    for layer in nums:
        mat = _int_matrix(obj[layer_of[layer]], path=path, what=f"layer {layer}", topk=topk)
        topk = mat.shape[1] if mat.shape[0] else topk
        if per_layer and mat.shape[0] != per_layer[0].shape[0]:
            raise ValueError(
                f"{path}: layer {layer} has {mat.shape[0]} tokens but layer 0 has "
                f"{per_layer[0].shape[0]}; layers must have equal length (truncated export?)"
            )
        per_layer.append(mat)
    experts = np.stack(per_layer, axis=1)  # [T, L, k]
    e = _resolve_num_experts(experts, num_experts, path=path,
                             locate=lambda b: f"layer {b[1]}, token {b[0]}")
    return RoutingTrace(experts=experts.astype(np.int32), num_experts=e, source=str(path))


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
        num_experts: E; checked if given, else inferred as the largest id + 1.
        ranks: read only records of these ranks (None: all); the others are counted on stderr.
        progress: print a line per file to stderr.

    Returns:
        RoutingTrace with experts int32 [T, L, k]; no token ids (the tracer records none).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("read_megatron_jsonl: no files given")
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
        try:
            fh = open(path, "r", encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"{path}: cannot open Megatron router trace: {exc.strerror}") from None
        with fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise _json_error(path, exc, line=lineno) from None
                where = f"{path}: line {lineno}"
                if not isinstance(rec, dict):
                    raise ValueError(f"{where}: expected a JSON object (one router record)")
                missing = [k for k in _MEGATRON_REQUIRED if k not in rec]
                if missing:
                    raise ValueError(
                        f"{where}: record lacks the field(s) {missing}; expected Megatron-Core "
                        f"router-trace records with {list(_MEGATRON_REQUIRED)}"
                    )
                if rec.get("block", "decoder") != "decoder":
                    skipped_block += 1
                    continue
                rank, step, layer = int(rec["rank"]), int(rec["step"]), int(rec["layer"])
                if keep_ranks is not None and rank not in keep_ranks:
                    skipped_rank += 1
                    continue
                rec_k = int(rec["topk"])
                if topk is None:
                    topk, topk_where = rec_k, where
                elif rec_k != topk:
                    raise ValueError(
                        f"{where}: topk={rec_k} but {topk_where} has topk={topk}; a trace must "
                        "have one top-k for all layers and tokens"
                    )
                mat = _int_matrix(rec["top_indices"], path=path,
                                  what=f"line {lineno} (step {step}, rank {rank}, layer {layer})",
                                  topk=rec_k)
                if mat.shape[0] != int(rec["num_tokens"]):
                    raise ValueError(
                        f"{where}: num_tokens={rec['num_tokens']} but top_indices has "
                        f"{mat.shape[0]} rows (truncated record?)"
                    )
                key = (step, rank, layer)
                if owner.setdefault(key, path) != path:
                    raise ValueError(
                        f"{where}: step {step}, rank {rank}, layer {layer} also appears in "
                        f"{owner[key]}; the files are from different runs or one was given twice "
                        "(read each run separately and concatenate)"
                    )
                groups.setdefault((step, rank), {}).setdefault(layer, []).append((path, lineno, mat))
    if skipped_block or skipped_rank:
        print(f"[trace_io] read_megatron_jsonl: skipped {skipped_block} record(s) of blocks other "
              f"than 'decoder' and {skipped_rank} of ranks not in {sorted(keep_ranks or [])}",
              file=sys.stderr)
    if not groups:
        raise ValueError(f"{', '.join(map(str, paths))}: no decoder router records"
                         + (f" and ranks {sorted(keep_ranks)}" if keep_ranks is not None else ""))
    layers = sorted({layer for g in groups.values() for layer in g})
    pieces = []
    for (step, rank) in sorted(groups):
        g = groups[(step, rank)]
        absent = [layer for layer in layers if layer not in g]
        if absent:
            path, lineno, _ = next(iter(g.values()))[0]
            raise ValueError(
                f"{path}: step {step}, rank {rank} has no records for layer(s) {absent} "
                f"(traced layers: {layers}); the trace is truncated (e.g. max_steps hit mid-step)"
            )
        passes = {layer: len(g[layer]) for layer in layers}
        if len(set(passes.values())) != 1:
            path = g[layers[0]][0][0]
            raise ValueError(
                f"{path}: step {step}, rank {rank}: layers fired an unequal number of times "
                f"{passes}; cannot pair tokens across layers"
            )
        for j in range(passes[layers[0]]):
            mats = [g[layer][j][2] for layer in layers]
            sizes = {m.shape[0] for m in mats}
            if len(sizes) != 1:
                counts = {layer: g[layer][j][2].shape[0] for layer in layers}
                raise ValueError(
                    f"{g[layers[0]][j][0]}: step {step}, rank {rank}, pass {j}: layers have "
                    f"unequal num_tokens {counts}; tokens cannot be paired across layers"
                )
            pieces.append(np.stack(mats, axis=1))
    experts = np.concatenate(pieces) if pieces else np.zeros((0, len(layers), topk or 1), np.int64)
    source = "+".join(str(p) for p in paths)
    e = _resolve_num_experts(experts, num_experts, path=source,
                             locate=lambda b: f"token {b[0]} (in merged order), layer {layers[b[1]]}")
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
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, header=hbytes, **arrays)
    os.replace(tmp, path)


def read_trace(path: PathLike) -> RoutingTrace:
    """Read a specmoe-npz trace written by ``write_trace``; checks header, shapes and ids."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise ValueError(f"{path}: no such trace file") from None
        raise ValueError(f"{path}: not a readable .npz trace (truncated or corrupt: {exc})") from None
    if "header" not in data:
        raise ValueError(f"{path}: .npz has no 'header' entry; not a {TRACE_NPZ_FORMAT} file "
                         f"(entries: {sorted(data)})")
    try:
        header = json.loads(data.pop("header").tobytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: header is not valid JSON ({exc}); the file is corrupt") from None
    if header.get("format") != TRACE_NPZ_FORMAT:
        raise ValueError(f"{path}: header format is {header.get('format')!r}, expected "
                         f"{TRACE_NPZ_FORMAT!r}")
    version = header.get("version")
    if version != TRACE_NPZ_VERSION:
        raise ValueError(
            f"{path}: trace format version {version!r} is not supported (this megatron_specmoe "
            f"reads version {TRACE_NPZ_VERSION}); re-export the trace with this version"
        )
    for key in ("num_experts", "num_tokens", "num_layers", "topk", "fields"):
        if key not in header:
            raise ValueError(f"{path}: header lacks the key {key!r}; the file is corrupt")
    fields = header["fields"]
    if set(fields) != set(data):
        raise ValueError(f"{path}: header lists fields {sorted(fields)} but the file holds "
                         f"{sorted(data)}; the file is corrupt")
    expect_tlk = [header["num_tokens"], header["num_layers"], header["topk"]]
    for name, arr in data.items():
        want = fields[name]
        if list(arr.shape) != want["shape"] or arr.dtype.str != want["dtype"]:
            raise ValueError(f"{path}: field {name!r} has shape {list(arr.shape)} dtype "
                             f"{arr.dtype.str}, header says {want['shape']} {want['dtype']}")
        shape = expect_tlk if name in ("experts", "probs") else expect_tlk[:1]
        if list(arr.shape) != shape:
            raise ValueError(f"{path}: field {name!r} has shape {list(arr.shape)}, expected "
                             f"{shape} from the header's num_tokens/num_layers/topk")
    if "experts" not in data:
        raise ValueError(f"{path}: no 'experts' array; the file is corrupt")
    experts = data["experts"].astype(np.int64)
    _resolve_num_experts(experts, int(header["num_experts"]), path=path,
                         locate=lambda b: f"token {b[0]}, layer {b[1]}")
    return RoutingTrace(
        experts=experts.astype(np.int32),
        num_experts=int(header["num_experts"]),
        source=str(path),
        **{name: data.get(name) for name in _OPTIONAL_FIELDS},
    )


# ---- dispatch --------------------------------------------------------------------------------------
def detect_format(path: PathLike) -> TraceFormat:
    """Format of one file: by suffix (.npz, .jsonl, .json), else by its first bytes."""
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
        raise ValueError(f"{path}: cannot open trace: {exc.strerror}") from None
    if head.startswith(b"PK"):
        return "specmoe-npz"
    text = head.lstrip()
    if text.startswith(b"{"):
        first_line = text.split(b"\n", 1)[0]
        return "megatron-jsonl" if b'"top_indices"' in first_line or b'"num_tokens"' in first_line \
            else "layer-major-json"
    raise ValueError(f"{path}: cannot tell the trace format (suffix {suffix!r}, starts with "
                     f"{head[:16]!r}); pass fmt= one of {list(get_args(TraceFormat))}")


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
                raise ValueError(f"{p}: directory holds no router_trace_rank*.jsonl files "
                                 "and no *.npz traces")
            out.extend(found)
        else:
            out.append(str(p))
    if not out:
        raise ValueError("read_traces: no trace files given")
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
    If ``num_experts`` is None, every file's E is inferred and the largest is used for all."""
    files = _expand(paths)
    allowed = get_args(TraceFormat)
    if fmt != "auto" and fmt not in allowed:
        raise ValueError(f"read_traces: unknown fmt {fmt!r}; expected 'auto' or one of {list(allowed)}")
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
        e = max(t.num_experts for t in traces)
        print(f"[trace_io] read_traces: inferred E differs by file "
              f"{[t.num_experts for t in traces]}; using E={e} (pass num_experts to be sure)",
              file=sys.stderr)
        traces = [RoutingTrace(experts=t.experts, num_experts=e, token_ids=t.token_ids,
                               positions=t.positions, request_ids=t.request_ids, probs=t.probs,
                               source=t.source) for t in traces]
    if num_experts is not None:
        for t in traces:
            if t.num_experts != num_experts:
                raise ValueError(f"{t.source}: file says num_experts={t.num_experts} but "
                                 f"num_experts={num_experts} was given")
    return traces[0] if len(traces) == 1 else RoutingTrace.concat(traces)


# ---- deduplication and cross-domain splits ----------------------------------------------------------
def _route_keys(trace: RoutingTrace) -> np.ndarray:
    """A [T, W] integer matrix whose rows are equal iff routes (and token ids, if any) are."""
    keys = trace.experts.reshape(trace.num_tokens, -1).astype(np.int64)
    if trace.token_ids is not None:
        keys = np.concatenate([keys, trace.token_ids[:, None].astype(np.int64)], axis=1)
    return keys


def dedup_routes(trace: RoutingTrace) -> tuple[RoutingTrace, np.ndarray]:
    """Drop tokens whose full route repeats an earlier token's, keeping the first occurrence.

    The key is the whole route experts[t] ([L, k], in router order) plus the token id when the
    trace has token ids (two different tokens with the same route are both kept).

    Returns:
        (deduplicated trace, kept) where kept is int64 [T'], ascending indices into ``trace``.
    """
    if trace.num_tokens == 0:
        return trace, np.zeros(0, dtype=np.int64)
    _, first = np.unique(_route_keys(trace), axis=0, return_index=True)
    kept = np.sort(first).astype(np.int64)
    return trace.select(kept), kept


@dataclass(frozen=True, kw_only=True)
class TraceSplit:
    """Tokens to fit a plan on and tokens from other files to evaluate it on.

    Attributes:
        fit, eval: the two traces (deduplicated when asked).
        fit_sources, eval_sources: the ``source`` of each input trace on either side.
        fit_duplicates, eval_duplicates: tokens dropped as repeated routes within a side.
        eval_seen_in_fit: eval tokens whose route (and token id) also occurs in ``fit`` and that
            were dropped (0 when ``drop_seen_in_fit`` was False).
    """

    fit: RoutingTrace
    eval: RoutingTrace
    fit_sources: tuple[str, ...]
    eval_sources: tuple[str, ...]
    fit_duplicates: int
    eval_duplicates: int
    eval_seen_in_fit: int


def cross_domain_split(
    fit: Sequence[RoutingTrace],
    eval: Sequence[RoutingTrace],
    *,
    dedup: bool = True,
    drop_seen_in_fit: bool = False,
) -> TraceSplit:
    """Fit on some files (workloads) and evaluate on others.

    Args:
        fit, eval: traces, typically one per file (read with ``read_traces(path)``).
        dedup: drop repeated routes within each side (keep first), as ``dedup_routes``.
        drop_seen_in_fit: also drop eval tokens whose exact route occurs in the fit side.
    """
    if not fit or not eval:
        raise ValueError("cross_domain_split: need at least one fit trace and one eval trace")
    fit_tr, eval_tr = RoutingTrace.concat(list(fit)), RoutingTrace.concat(list(eval))
    fit_dup = eval_dup = seen = 0
    if dedup:
        n = fit_tr.num_tokens
        fit_tr, _ = dedup_routes(fit_tr)
        fit_dup = n - fit_tr.num_tokens
        n = eval_tr.num_tokens
        eval_tr, _ = dedup_routes(eval_tr)
        eval_dup = n - eval_tr.num_tokens
    if drop_seen_in_fit and eval_tr.num_tokens and fit_tr.num_tokens:
        fk, ek = _route_keys(fit_tr), _route_keys(eval_tr)
        if fk.shape[1] != ek.shape[1]:
            raise ValueError("cross_domain_split: one side has token ids and the other not; "
                             "cannot compare routes")
        fit_set = {row.tobytes() for row in fk}
        keep = np.array([row.tobytes() not in fit_set for row in ek])
        seen = int((~keep).sum())
        eval_tr = eval_tr.select(np.flatnonzero(keep))
    return TraceSplit(
        fit=fit_tr,
        eval=eval_tr,
        fit_sources=tuple(t.source for t in fit),
        eval_sources=tuple(t.source for t in eval),
        fit_duplicates=fit_dup,
        eval_duplicates=eval_dup,
        eval_seen_in_fit=seen,
    )


def leave_one_out_splits(
    traces: Sequence[RoutingTrace], *, dedup: bool = True, drop_seen_in_fit: bool = False
) -> list[TraceSplit]:
    """One split per trace: evaluate on it, fit on all the others (in their given order)."""
    if len(traces) < 2:
        raise ValueError(f"leave_one_out_splits: need at least 2 traces (files), got {len(traces)}")
    return [
        cross_domain_split([t for j, t in enumerate(traces) if j != i], [traces[i]],
                           dedup=dedup, drop_seen_in_fit=drop_seen_in_fit)
        for i in range(len(traces))
    ]

"""The bad-input corpus, part 1: every trace reader under every command that reads traces, and the
plan folder under every command that reads plans (issue 18; the contract is docs/cli_errors.md,
the check ``bad_inputs.check_result``). ``finding N`` in a case id: it reproduces that finding.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bad_inputs import (
    Case,
    both,
    check_result,
    edit_header,
    fifo,
    json_trace,
    jsonl_trace,
    make_good,
    npz_trace,
    plan_copy,
    raw,
    snapshot,
    subdir,
    text,
    zip_of,
)


def _set(obj, layer, token, value):
    obj[str(layer)][token] = value


def _rec(i, **changes):
    def edit(recs):
        recs[i].update(changes)
    return edit


def _del(i, key):
    def edit(recs):
        del recs[i][key]
    return edit


# (name, file the command gets, needs --num-experts, setup, exit code, pattern)
# The pattern names the file and what is wrong; check_result also asserts the " -- fix" part.
TRACES = [
    # -- any reader
    ("missing json (finding 5)", "{d}/nope.json", True, None, 1, r"trace .*nope\.json: no such file -- check the path"),
    ("missing npz", "{d}/nope.npz", False, None, 1, r"nope\.npz: no such file"),
    ("folder without traces", "{d}/empty", False, subdir("empty"), 1, r"empty: directory holds no router_trace_rank\*\.jsonl files and no \*\.npz"),
    ("fifo as trace (finding 5)", "{d}/pipe.json", True, fifo("pipe.json"), 1, r"pipe\.json: is a FIFO \(named pipe\), not a regular file.* -- give a regular file"),
    ("/dev/zero as trace (finding 5)", "/dev/zero", True, None, 1, r"/dev/zero: is a device, not a regular file"),
    ("unknown format", "{d}/t.bin", True, raw("t.bin", b"\x00\x01garbage"), 1, r"t\.bin: cannot tell the trace format .* -- give a \.json, \.jsonl or \.npz"),
    ("empty file no suffix", "{d}/t", True, raw("t", b""), 1, r"cannot tell the trace format"),
    # -- layer-major JSON
    ("json without --num-experts (finding 4)", "{g}/good.json", False, None, 2, r"good\.json: a layer-major JSON trace does not record the number of experts.* -- pass --num-experts E"),
    ("json empty file", "{d}/t.json", True, text("t.json", ""), 1, r"t\.json: not valid JSON at line 1"),
    ("json truncated", "{d}/t.json", True, text("t.json", '{"0": [[0, 1], [2'), 1, r"t\.json: not valid JSON at line 1, column \d+ .* -- the file is truncated or corrupt"),
    ("json not utf-8", "{d}/t.json", True, raw("t.json", b'{"0": [[0, 1]]}\xff\xfe'), 1, r"t\.json: not UTF-8 text at byte"),
    ("json top-level list", "{d}/t.json", True, text("t.json", "[[0, 1]]"), 1, r"t\.json: expected a JSON object keyed by layer number, got list"),
    ("json no layers", "{d}/t.json", True, text("t.json", "{}"), 1, r"t\.json: the JSON object has no layer keys"),
    ("json bad key", "{d}/t.json", True, text("t.json", '{"layer0": [[0, 1]]}'), 1, r"key 'layer0' is not a layer number"),
    ("json key gap", "{d}/t.json", True, text("t.json", '{"0": [[0, 1]], "2": [[0, 1]]}'), 1, r"layer keys are not contiguous from 0: .*missing \[1\]"),
    ("json layer not list", "{d}/t.json", True, text("t.json", '{"0": 5}'), 1, r"layer 0 should be a list of per-token expert lists, got int"),
    ("json token not list", "{d}/t.json", True, json_trace("t.json", lambda o: _set(o, 0, 3, 7)), 1, r"layer 0, token 3: expected a list of expert ids"),
    ("json top-k differs", "{d}/t.json", True, json_trace("t.json", lambda o: _set(o, 1, 4, [0, 1, 2])), 1, r"layer 1, token 4: has 3 experts but top-k is 2"),
    ("json top-k 0", "{d}/t.json", True, text("t.json", '{"0": [[], []]}'), 1, r"top-k is 0"),
    ("json unequal layers", "{d}/t.json", True, json_trace("t.json", lambda o: o["2"].pop()), 1, r"layer 2 has 95 tokens but layer 0 has 96"),
    ("json float id (finding 10)", "{d}/t.json", True, json_trace("t.json", lambda o: _set(o, 0, 5, [1, 1.7])), 1, r"layer 0, token 5: expert id 1\.7 is not an integer"),
    ("json float id 3.0", "{d}/t.json", True, json_trace("t.json", lambda o: _set(o, 0, 5, [1, 3.0])), 1, r"expert id 3\.0 is not an integer"),
    ("json bool id (finding 10)", "{d}/t.json", True, json_trace("t.json", lambda o: _set(o, 2, 0, [True, 3])), 1, r"layer 2, token 0: expert id True is not an integer"),
    ("json string id (finding 10)", "{d}/t.json", True, json_trace("t.json", lambda o: _set(o, 1, 1, ["3", 4])), 1, r"expert id '3' is not an integer"),
    ("json null id", "{d}/t.json", True, json_trace("t.json", lambda o: _set(o, 1, 1, [None, 4])), 1, r"expert id None is not an integer"),
    ("json negative id", "{d}/t.json", True, json_trace("t.json", lambda o: _set(o, 0, 2, [0, -1])), 1, r"layer 0, token 2: expert id -1 is out of range 0\.\.7"),
    ("json stray id 9 (finding 4)", "{d}/t.json", True, json_trace("t.json", lambda o: _set(o, 2, 7, [0, 9])), 1, r"layer 2, token 7: expert id 9 is out of range 0\.\.7 \(num_experts=8\) -- pass the model's --num-experts"),
    ("json id 10**6 (finding 4)", "{d}/t.json", True, json_trace("t.json", lambda o: _set(o, 0, 0, [0, 10**6])), 1, r"expert id 1000000 is out of range 0\.\.7"),
    ("json id 2**32 (finding 4)", "{d}/t.json", True, json_trace("t.json", lambda o: _set(o, 0, 0, [0, 2**32])), 1, r"expert id 4294967296 is out of range"),
    ("json id 2**70", "{d}/t.json", True, json_trace("t.json", lambda o: _set(o, 0, 0, [0, 2**70])), 1, r"expert id 1180591620717411303424 is out of range"),
    ("json repeated expert (finding 3)", "{d}/t.json", True, json_trace("t.json", lambda o: _set(o, 1, 9, [4, 4])), 1, r"layer 1, token 9: expert ids \[4, 4\] repeat an expert -- a route lists k distinct experts"),
    # -- Megatron-Core router-trace JSONL
    ("jsonl without --num-experts (finding 4)", "{g}/mega", False, None, 2, r"Megatron router-trace JSONL trace does not record the number of experts"),
    ("jsonl step string (finding 5)", "{d}/router_trace_rank0.jsonl", True, jsonl_trace(_rec(0, step="zero")), 1, r"line 1: field 'step' is 'zero', not an integer"),
    ("jsonl layer float (finding 5)", "{d}/router_trace_rank0.jsonl", True, jsonl_trace(_rec(1, layer=1.7)), 1, r"line 2: field 'layer' is 1\.7, not an integer"),
    ("jsonl rank bool", "{d}/router_trace_rank0.jsonl", True, jsonl_trace(_rec(0, rank=True)), 1, r"line 1: field 'rank' is True, not an integer"),
    ("jsonl topk string", "{d}/router_trace_rank0.jsonl", True, jsonl_trace(_rec(0, topk="2")), 1, r"field 'topk' is '2', not an integer"),
    ("jsonl num_tokens float", "{d}/router_trace_rank0.jsonl", True, jsonl_trace(_rec(0, num_tokens=48.0)), 1, r"field 'num_tokens' is 48\.0, not an integer"),
    ("jsonl missing field", "{d}/router_trace_rank0.jsonl", True, jsonl_trace(_del(2, "top_indices")), 1, r"line 3: record lacks the field\(s\) \['top_indices'\]"),
    ("jsonl not an object", "{d}/router_trace_rank0.jsonl", True, jsonl_trace(lambda r: r[:1] + ["[1, 2]"] + r[1:]), 1, r"line 2: expected a JSON object \(one router record\)"),
    ("jsonl truncated line", "{d}/router_trace_rank0.jsonl", True, jsonl_trace(lambda r: r[:3] + ['{"step": 1, "lay']), 1, r"not valid JSON at line 4"),
    ("jsonl not utf-8", "{d}/router_trace_rank0.jsonl", True, raw("router_trace_rank0.jsonl", b'{"step": 0}\n\xff\xfe\n'), 1, r"router_trace_rank0\.jsonl: not UTF-8 text after line \d"),
    ("jsonl top-k differs", "{d}/router_trace_rank0.jsonl", True, jsonl_trace(_rec(1, topk=1, top_indices=[[0]] * 48)), 1, r"line 2: topk=1 but .*line 1 has topk=2"),
    ("jsonl num_tokens wrong", "{d}/router_trace_rank0.jsonl", True, jsonl_trace(_rec(0, num_tokens=5)), 1, r"line 1: num_tokens=5 but top_indices has 48 rows"),
    ("jsonl step cut short", "{d}/router_trace_rank0.jsonl", True, jsonl_trace(lambda r: r[:3]), 1, r"step 1, rank 0 has no records for layer\(s\) \[3\].* -- the trace is truncated"),
    ("jsonl layers unequal tokens", "{d}/router_trace_rank0.jsonl", True, jsonl_trace(_rec(1, num_tokens=1, top_indices=[[0, 1]])), 1, r"layers have unequal num_tokens"),
    ("jsonl only mtp records", "{d}/router_trace_rank0.jsonl", True, jsonl_trace(lambda r: [dict(x, block="mtp") for x in r]), 1, r"no decoder router records"),
    ("jsonl stray id (finding 4)", "{d}/router_trace_rank0.jsonl", True, jsonl_trace(_rec(0, top_indices=[[0, 12]] + [[0, 1]] * 47)), 1, r"token 0: expert id 12 is out of range 0\.\.7"),
    ("jsonl float id (finding 10)", "{d}/router_trace_rank0.jsonl", True, jsonl_trace(_rec(0, top_indices=[[0, 2.5]] + [[0, 1]] * 47)), 1, r"expert id 2\.5 is not an integer"),
    ("jsonl repeated expert (finding 3)", "{d}/router_trace_rank0.jsonl", True, jsonl_trace(_rec(2, top_indices=[[3, 3]] + [[0, 1]] * 47)), 1, r"expert ids \[3, 3\] repeat an expert"),
    # -- specmoe .npz
    ("npz not a zip", "{d}/t.npz", False, raw("t.npz", b"not a zip at all"), 1, r"t\.npz: not a readable \.npz trace .* -- the file is truncated or corrupt"),
    ("npz truncated", "{d}/t.npz", False, lambda d, g: (d / "t.npz").write_bytes((g / "good.npz").read_bytes()[:300]), 1, r"t\.npz: not a readable \.npz trace"),
    ("npz fifo (finding 5)", "{d}/t.npz", False, fifo("t.npz"), 1, r"t\.npz: is a FIFO"),
    ("npz without header", "{d}/t.npz", False, lambda d, g: np.savez(d / "t.npz", experts=np.zeros((2, 3, 2), np.uint8)), 1, r"t\.npz: \.npz has no 'header' entry"),
    ("npz pickled object", "{d}/t.npz", False, lambda d, g: np.savez(d / "t.npz", header=np.array([{"a": 1}], dtype=object)), 1, r"t\.npz: not a readable \.npz trace"),
    ("npz header not json", "{d}/t.npz", False, lambda d, g: np.savez(d / "t.npz", header=np.frombuffer(b"{oops", np.uint8)), 1, r"header is not valid JSON"),
    ("npz header a list", "{d}/t.npz", False, lambda d, g: np.savez(d / "t.npz", header=np.frombuffer(b"[1]", np.uint8)), 1, r"header format is 'list'"),
    ("npz wrong format", "{d}/t.npz", False, npz_trace("t.npz", lambda h, a: h.update(format="other")), 1, r"header format is 'other', expected 'specmoe-trace'"),
    ("npz newer version", "{d}/t.npz", False, npz_trace("t.npz", lambda h, a: h.update(version=2)), 1, r"trace format version 2 is not supported .* -- re-export the trace"),
    ("npz header lacks topk", "{d}/t.npz", False, npz_trace("t.npz", lambda h, a: h.pop("topk")), 1, r"header lacks the key 'topk'"),
    ("npz num_experts 0", "{d}/t.npz", False, npz_trace("t.npz", lambda h, a: h.update(num_experts=0)), 1, r"header num_experts=0 is not a count|header num_experts 0: out of range"),
    ("npz num_experts 10**9 (finding 4)", "{d}/t.npz", False, npz_trace("t.npz", lambda h, a: h.update(num_experts=10**9)), 1, r"header num_experts 1000000000: out of range 1\.\.65536"),
    ("npz num_experts float", "{d}/t.npz", False, npz_trace("t.npz", lambda h, a: h.update(num_experts=8.0)), 1, r"header num_experts=8\.0 is not a count"),
    ("npz fields mismatch", "{d}/t.npz", False, npz_trace("t.npz", lambda h, a: a.pop("token_ids")), 1, r"header lists fields .* but the file holds"),
    ("npz shape vs header", "{d}/t.npz", False, npz_trace("t.npz", lambda h, a: h.update(num_tokens=95)), 1, r"field 'experts' has shape \[96, 3, 2\], expected \[95, 3, 2\]"),
    ("npz float ids 3.7 (finding 4)", "{d}/t.npz", False, npz_trace("t.npz", lambda h, a: a.update(experts=a["experts"].astype(np.float32) + 0.7)), 1, r"field 'experts' is stored as float32, not integers"),
    ("npz float token ids (finding 10)", "{d}/t.npz", False, npz_trace("t.npz", lambda h, a: a.update(token_ids=a["token_ids"].astype(np.float64) + 0.7)), 1, r"field 'token_ids' is stored as float64, not integers \(1\.7 would be read as 1\)"),
    ("npz stray id (finding 4)", "{d}/t.npz", False, npz_trace("t.npz", lambda h, a: a["experts"].__setitem__((4, 1, 0), 200)), 1, r"expert id 200 at token 4, layer 1 is out of range 0\.\.7"),
    ("npz repeated expert (finding 3)", "{d}/t.npz", False, npz_trace("t.npz", lambda h, a: a["experts"].__setitem__((6, 2), [5, 5])), 1, r"route \[5, 5\] at token 6, layer 2 repeats an expert"),
    ("npz num_experts differs from --num-experts", "{g}/good.npz", "16", None, 1, r"good\.npz: the file records num_experts=8 but 16 was given"),
]

TRACE_COMMANDS = {
    "plan": ["plan", "--ep", "2", "--out", "{d}/out", "--predictor", "layer", "--placement", "contiguous"],
    "group": ["group", "--ep", "2", "--method", "contiguous", "--out", "{d}/out.json"],
    "simulate": ["simulate", "--ep", "2", "--tokens-per-rank", "4", "--json", "{d}/out.json"],
    "evaluate": ["evaluate", "--plan", "{g}/plan"],
}
ABSENT = {"plan": ("{d}/out",), "group": ("{d}/out.json",), "simulate": ("{d}/out.json",), "evaluate": ()}


def _trace_cases():
    cases = []
    for command, head in TRACE_COMMANDS.items():
        for name, path, needs_e, setup, code, pattern in TRACES:
            extra = []
            if needs_e is True:
                extra = ["--num-experts", "8"]
            elif isinstance(needs_e, str):
                if command == "evaluate":
                    continue  # evaluate checks --num-experts against the plan first (its own case)
                extra = ["--num-experts", needs_e]
            argv = (*head, "--traces", path, *extra)
            cases.append(Case(id=f"{command}: {name}", argv=argv, code=code, pattern=pattern,
                              setup=setup, absent=ABSENT[command]))
    return cases


def _seal_del(key):
    return edit_header(lambda doc: doc.pop(key), seal=True)


# (name, setup making {d}/plan (or the path given), pattern, code)
PLANS = [
    ("missing plan folder", "{d}/noplan", None, r"noplan: no such plan folder -- make one with `specmoe plan", 1),
    ("plan is a file", "{d}/f", text("f", "x"), r"f: is a file, not a plan folder", 1),
    ("empty folder", "{d}/e", subdir("e"), r"e/plan\.json: missing; .* is not a plan folder", 1),
    ("plan.json not JSON", "{d}/plan", plan_copy(lambda f: (f / "plan.json").write_text("{")), r"plan\.json: not valid JSON at line 1", 1),
    ("plan.json not utf-8", "{d}/plan", plan_copy(lambda f: (f / "plan.json").write_bytes(b"\xff\xfe")), r"plan\.json: not UTF-8 text", 1),
    ("plan.json a list", "{d}/plan", plan_copy(lambda f: (f / "plan.json").write_text("[]")), r"plan\.json: format is 'list', expected 'specmoe-plan'", 1),
    ("plan.json other format", "{d}/plan", plan_copy(edit_header(lambda d: d.update(format="x"), seal=False)), r"format is 'x', expected 'specmoe-plan'", 1),
    ("plan.json a fifo (finding 5)", "{d}/plan", plan_copy(lambda f: ((f / "plan.json").unlink(), __import__("os").mkfifo(f / "plan.json"))), r"plan\.json: is a FIFO", 1),
    ("plan.json a folder", "{d}/plan", plan_copy(lambda f: ((f / "plan.json").unlink(), (f / "plan.json").mkdir())), r"plan\.json: is a directory", 1),
    ("edited ep_size (finding 2)", "{d}/plan", plan_copy(edit_header(lambda d: d.update(ep_size=1), seal=False)), r"plan\.json: its sha256 is .* header_sha256 .* edited or corrupted .* -- re-run `specmoe plan`", 1),
    ("edited notes (finding 2)", "{d}/plan", plan_copy(edit_header(lambda d: d["notes"].update(x=1), seal=False)), r"the header was edited or corrupted", 1),
    ("header_sha256 removed (finding 2)", "{d}/plan", plan_copy(edit_header(lambda d: d.pop("header_sha256"), seal=False)), r"records header_sha256 'None'", 1),
    ("format version 1", "{d}/plan", plan_copy(edit_header(lambda d: d.update(format_version=1), seal=True)), r"plan format version 1 .* older .* cannot be migrated -- re-run `specmoe plan`", 1),
    ("format version 99", "{d}/plan", plan_copy(edit_header(lambda d: d.update(format_version=99), seal=True)), r"version 99 .* is newer .* -- upgrade megatron_specmoe", 1),
    ("format version string", "{d}/plan", plan_copy(edit_header(lambda d: d.update(format_version="2"), seal=True)), r"format_version is '2', expected an integer", 1),
    ("header lacks num_layers", "{d}/plan", plan_copy(_seal_del("num_layers")), r"header lacks the field\(s\) \['num_layers'\]", 1),
    ("header ep_size float", "{d}/plan", plan_copy(edit_header(lambda d: d.update(ep_size=2.0), seal=True)), r"PlanHeader\.ep_size must be a positive integer, got 2\.0", 1),
    ("header num_experts bool", "{d}/plan", plan_copy(edit_header(lambda d: d.update(num_experts=True), seal=True)), r"PlanHeader\.num_experts must be a positive integer, got True", 1),
    ("header lists no arrays", "{d}/plan", plan_copy(edit_header(lambda d: d["predictors"]["layer"].update(arrays=[]), seal=True)), r"tensors\.npz: holds arrays that plan\.json does not list", 1),
    ("tensors missing", "{d}/plan", plan_copy(lambda f: (f / "tensors.npz").unlink()), r"tensors\.npz: missing; the plan folder is incomplete", 1),
    ("tensors a fifo (finding 5)", "{d}/plan", plan_copy(lambda f: ((f / "tensors.npz").unlink(), __import__("os").mkfifo(f / "tensors.npz"))), r"tensors\.npz: is a FIFO \(named pipe\)", 1),
    ("tensors a folder", "{d}/plan", plan_copy(lambda f: ((f / "tensors.npz").unlink(), (f / "tensors.npz").mkdir())), r"tensors\.npz: is a directory", 1),
    ("tensors flipped byte", "{d}/plan", plan_copy(lambda f: (f / "tensors.npz").write_bytes((f / "tensors.npz").read_bytes()[:-9] + b"x" + (f / "tensors.npz").read_bytes()[-8:])), r"tensors\.npz: sha256 is [0-9a-f]{64} but plan\.json records", 1),
    ("tensors empty", "{d}/plan", plan_copy(lambda f: (f / "tensors.npz").write_bytes(b"")), r"tensors\.npz: sha256 is", 1),
]
PLAN_COMMANDS = {
    "evaluate": ["evaluate", "--traces", "{g}/good.npz", "--plan"],
    "simulate": ["simulate", "--traces", "{g}/good.npz", "--ep", "2", "--tokens-per-rank", "4", "--json", "{d}/out.json", "--plan"],
}


def _plan_cases():
    return [Case(id=f"{cmd}: {name}", argv=(*head, path), code=code, pattern=pattern, setup=setup,
                 absent=("{d}/out.json",))
            for cmd, head in PLAN_COMMANDS.items() for name, path, setup, pattern, code in PLANS]


CASES = _trace_cases() + _plan_cases()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    g = tmp_path_factory.mktemp("good")
    make_good(g)
    return g, snapshot(g)


def run_case(case: Case, d, good_dir, before, capsys, monkeypatch):
    from megatron_specmoe import launch
    from megatron_specmoe.cli.main import main

    g = good_dir
    monkeypatch.chdir(d)
    if case.setup is not None:
        case.setup(d, g)
    argv = [a.format(d=d, g=g) for a in case.argv]
    capsys.readouterr()
    try:
        code = (launch.main if case.entry == "specmoe-launch" else main)(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    check_result(case, code, err, d, g, before)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, good, tmp_path, capsys, monkeypatch):
    run_case(case, tmp_path, good[0], good[1], capsys, monkeypatch)


def test_the_corpus_is_large_and_covers_every_reader():
    assert len(CASES) >= 200
    assert {c.argv[0] for c in CASES} == {"plan", "group", "simulate", "evaluate"}
    assert len({c.id for c in CASES}) == len(CASES)


def test_good_inputs_pass(good, tmp_path, capsys):
    """The corpus's good inputs are good: each command runs on them (so a case fails for its
    one bad thing)."""
    from megatron_specmoe.cli.main import main

    g = good[0]
    for argv in (["evaluate", "--plan", f"{g}/plan", "--traces", f"{g}/good.npz"],
                 ["evaluate", "--plan", f"{g}/plan", "--traces", f"{g}/good.json", "--num-experts", "8"],
                 ["evaluate", "--plan", f"{g}/plan", "--traces", f"{g}/mega", "--num-experts", "8", "--kind", "layer"],
                 ["group", "--traces", f"{g}/good.npz", "--ep", "2", "--method", "contiguous", "--out", f"{tmp_path}/p.json"]):
        if "mega" in argv[4]:
            continue  # the JSONL trace has 2 layers, the plan 3: its own check below
        assert main(argv) == 0, argv
    assert json.loads((tmp_path / "p.json").read_text())["num_experts"] == 8
    assert main(["plan", "--traces", f"{g}/mega", "--num-experts", "8", "--ep", "2", "--out",
                 f"{tmp_path}/mplan", "--predictor", "layer", "--placement", "contiguous"]) == 0

"""The bad-input corpus, part 2: every command's flags, the checkpoint folder (``demo
--checkpoint``), the recipes, the launcher (its own command line and the --specmoe-* flags through
Megatron-LM's real parser), and a few real subprocesses (no traceback end to end; the known
megatron-core warnings hidden, issue 18 finding 12). Contract: docs/cli_errors.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from bad_inputs import Case, check_result, edit_header, fifo, make_good, plan_copy, raw, snapshot, subdir, text
from test_bad_inputs import run_case

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "megatron_specmoe" / "data"
P = ["plan", "--traces", "{g}/good.npz", "--out", "{d}/out"]
G = ["group", "--traces", "{g}/good.npz", "--out", "{d}/out.json"]
S = ["simulate", "--traces", "{g}/good.npz", "--json", "{d}/out.json"]
V = ["evaluate", "--plan", "{g}/plan", "--traces", "{g}/good.npz"]
D = ["demo", "--out-dir", "{d}/demo"]


def c(id, argv, code, pattern, setup=None, absent=(), argparse=False, entry="specmoe", needs=()):
    return Case(id=id, argv=tuple(argv), code=code, pattern=pattern, setup=setup, absent=tuple(absent),
                argparse=argparse, entry=entry, needs=tuple(needs))


FLAGS = [
    # -- specmoe plan
    c("plan --ep 0", [*P, "--ep", "0"], 2, r"--ep 0: must be >= 1 -- give the EP size", absent=["{d}/out"]),
    c("plan --ep -4", [*P, "--ep", "-4"], 2, r"--ep -4: must be >= 1", absent=["{d}/out"]),
    c("plan --ep 3 does not divide", [*P, "--ep", "3"], 2, r"--ep 3 does not divide the traces' 8 experts", absent=["{d}/out"]),
    c("plan --ep x", [*P, "--ep", "x"], 2, r"argument --ep: invalid int value: 'x'", argparse=True),
    c("plan no --traces", ["plan", "--ep", "2", "--out", "{d}/out"], 2, r"the following arguments are required: --traces", argparse=True),
    c("plan --num-experts 0 (finding 4)", [*P, "--ep", "2", "--num-experts", "0"], 2, r"--num-experts 0: out of range 1\.\.65536"),
    c("plan --num-experts 10**9 (finding 4)", [*P, "--ep", "2", "--num-experts", "1000000000"], 2, r"--num-experts 1000000000: out of range 1\.\.65536"),
    c("plan --num-experts 2.5", [*P, "--ep", "2", "--num-experts", "2.5"], 2, r"argument --num-experts: invalid int value: '2\.5'", argparse=True),
    c("plan --num-experts 16 vs an 8-expert npz (finding 4)", [*P, "--ep", "2", "--num-experts", "16"], 1, r"good\.npz: the file records num_experts=8 but 16 was given", absent=["{d}/out"]),
    c("plan --num-experts 6 --ep 4", [*P, "--ep", "4", "--num-experts", "6"], 2, r"--ep 4 does not divide --num-experts 6"),
    c("plan --predictor bogus", [*P, "--ep", "2", "--predictor", "bogus"], 2, r"--predictor bogus: unknown predictor kind 'bogus'"),
    c("plan --predictor pregate", [*P, "--ep", "2", "--predictor", "pregate"], 2, r"--predictor pregate: .*'pregate' needs the model"),
    c("plan --members bogus", [*P, "--ep", "2", "--members", "layer,bogus"], 2, r"--members layer,bogus: unknown predictor kind 'bogus'"),
    c("plan --placement bogus", [*P, "--ep", "2", "--placement", "bogus"], 2, r"--placement bogus / --theta 0\.1: .* -- see `specmoe plan --help`"),
    c("plan --theta 2", [*P, "--ep", "2", "--theta", "2"], 2, r"--theta 2\.0: .*must lie in \[0, 1\]"),
    c("plan --hidden-size 0", [*P, "--ep", "2", "--hidden-size", "0"], 2, r"--hidden-size 0: must be >= 1"),
    c("plan --vocab-size -1", [*P, "--ep", "2", "--vocab-size", "-1"], 2, r"--vocab-size -1: must be >= 1"),
    c("plan --out an existing file (finding 5)", ["plan", "--traces", "{g}/good.npz", "--ep", "2", "--out", "{d}/f"], 2, r"--out .*f: exists and is not a folder -- remove it or choose another --out", setup=text("f", "keep me")),
    c("plan --out in a missing folder", ["plan", "--traces", "{g}/good.npz", "--ep", "2", "--out", "{d}/no/such/out"], 2, r"--out .*: the folder .*no/such does not exist -- create"),
    c("plan --out a non-plan folder", ["plan", "--traces", "{g}/good.npz", "--ep", "2", "--out", "{d}/src"], 2, r"--out .*src: is a non-empty folder without plan\.json; it would be replaced", setup=lambda d, g: ((d / "src").mkdir(), (d / "src" / "main.py").write_text("x"))),
    c("plan token predictor without ids", ["plan", "--traces", "{g}/noids.npz", "--ep", "2", "--out", "{d}/out", "--predictor", "token"], 2, r"--predictor token needs token ids, and the traces .*noids\.npz carry none -- use --predictor layer", absent=["{d}/out"]),
    c("plan combined default without ids uses layer+history", ["plan", "--traces", "{g}/noids.npz", "--ep", "2", "--out", "{d}/out", "--members", "token,layer"], 2, r"--predictor combined needs token ids", absent=["{d}/out"]),
    c("plan --placement unknown method", [*P, "--ep", "2", "--placement", "kmeans"], 2, r"--placement kmeans"),
    # -- specmoe group
    c("group --ep 0 (finding 5)", [*G, "--ep", "0"], 2, r"--ep 0: must be >= 1", absent=["{d}/out.json"]),
    c("group --ep -2", [*G, "--ep", "-2"], 2, r"--ep -2: must be >= 1"),
    c("group --ep 3", [*G, "--ep", "3"], 2, r"--ep 3 does not divide the traces' num_experts=8", absent=["{d}/out.json"]),
    c("group --method bogus", [*G, "--ep", "2", "--method", "bogus"], 2, r"--method bogus / --theta 0\.1"),
    c("group --theta -1", [*G, "--ep", "2", "--theta", "-1"], 2, r"--theta -1\.0: .*\[0, 1\]"),
    c("group --restarts -1", [*G, "--ep", "2", "--restarts", "-1"], 2, r"--restarts -1: must be >= 0"),
    c("group --num-experts 0", [*G, "--ep", "2", "--num-experts", "0"], 2, r"--num-experts 0: out of range"),
    c("group --out a folder", ["group", "--traces", "{g}/good.npz", "--ep", "2", "--out", "{d}"], 2, r"--out .*: is a directory, expected a file name"),
    c("group --out in a missing folder", ["group", "--traces", "{g}/good.npz", "--ep", "2", "--out", "{d}/no/p.json"], 2, r"--out .*p\.json: the folder .*no does not exist"),
    c("group --out a fifo", ["group", "--traces", "{g}/good.npz", "--ep", "2", "--out", "{d}/p"], 2, r"--out .*p: exists and is not a regular file", setup=fifo("p")),
    c("group --ep x", [*G, "--ep", "x"], 2, r"argument --ep: invalid int value", argparse=True),
    # -- specmoe simulate
    c("simulate --tokens-per-rank 0 (finding 5)", [*S, "--tokens-per-rank", "0"], 2, r"--tokens-per-rank 0: must be >= 1", absent=["{d}/out.json"]),
    c("simulate --tokens-per-rank -4 (finding 5)", [*S, "--tokens-per-rank", "-4"], 2, r"--tokens-per-rank -4: must be >= 1"),
    c("simulate --hidden 0", [*S, "--hidden", "0"], 2, r"--hidden 0: must be >= 1"),
    c("simulate --ep 8,x", [*S, "--ep", "8,x"], 2, r"--ep '8,x': not comma-separated integers -- give EP sizes"),
    c("simulate --ep 0", [*S, "--ep", "0"], 2, r"--ep '0': needs positive EP sizes"),
    c("simulate --ep empty", [*S, "--ep", ","], 2, r"--ep ',': needs positive EP sizes"),
    c("simulate --tp x", [*S, "--ep", "8", "--tp", "x"], 2, r"--tp 'x': not an int, 'node' or 'ep'"),
    c("simulate --tp 3", [*S, "--ep", "8", "--tp", "3"], 2, r"--tp 3: must divide every EP size, and EP 8 is not a multiple"),
    c("simulate --dtype fp7", [*S, "--dtype", "fp7"], 2, r"argument --dtype: invalid choice: 'fp7'", argparse=True),
    c("simulate --dtype with --dispatch-dtype", [*S, "--dtype", "bf16", "--dispatch-dtype", "fp8"], 2, r"--dtype sets both phases and cannot go with --dispatch-dtype"),
    c("simulate fp8 with --hidden 100", [*S, "--hidden", "100", "--dispatch-dtype", "fp8"], 2, r"--hidden 100 / dtypes: .*multiple of 128"),
    c("simulate --dispatchers unknown", [*S, "--dispatchers", "alltoall,dedup"], 2, r"--dispatchers: unknown \['dedup'\] -- choose from"),
    c("simulate --plan-kernels -1", [*S, "--plan-kernels", "-1"], 2, r"--plan-kernels -1: must be >= 0"),
    c("simulate --context 0", [*S, "--context", "0"], 2, r"--context 0: must be >= 1"),
    c("simulate --calibration with --traces", [*S, "--calibration"], 2, r"--calibration uses the published measurements' own routes -- drop --traces"),
    c("simulate --calibration --json a folder", ["simulate", "--calibration", "--json", "{d}"], 2, r"--json .*: is a directory"),
    c("simulate without --traces", ["simulate"], 2, r"no traces given -- pass --traces"),
    c("simulate --request-placement unknown", [*S, "--ep", "2", "--tp", "1", "--request-placement", "nearest"], 2,
      r"--request-placement 'nearest' is not a method -- choose one of \['round_robin'"),
    c("simulate --request-placement with TP > 1", [*S, "--ep", "2", "--request-placement", "round_robin"], 2,
      r"--request-placement models DP attention \(TP = 1.*--tp node gives TP = 2 at EP 2 -- pass --tp 1"),
    c("simulate --request-placement without request ids", [*S, "--ep", "2", "--tp", "1", "--tokens-per-rank", "4",
      "--request-placement", "round_robin"], 1, r"--request-placement needs traces with request ids; .*good\.npz carry none"),
    c("simulate --json a folder (finding 5)", ["simulate", "--traces", "{g}/good.npz", "--json", "{d}"], 2, r"--json .*: is a directory, expected a file name"),
    c("simulate --plot in a missing folder", [*S, "--plot", "{d}/no/x.png"], 2, r"--plot .*x\.png: the folder .*no does not exist", absent=["{d}/out.json"]),
    c("simulate --predictor layer without fit traces", [*S, "--predictor", "layer"], 2, r"--predictor layer needs traces to fit on -- add --fit-traces"),
    c("simulate --predictor plan without plan", [*S, "--predictor", "plan"], 2, r"--predictor plan needs a plan -- add --plan DIR"),
    c("simulate --predictor bogus", [*S, "--ep", "2", "--tokens-per-rank", "4", "--predictor", "bogus", "--fit-traces", "{g}/good.npz"], 2, r"--predictor bogus: unknown predictor kind", absent=["{d}/out.json"]),
    c("simulate --plan-kind bogus", [*S, "--ep", "2", "--tokens-per-rank", "4", "--plan", "{g}/plan", "--plan-kind", "bogus"], 2, r"--plan-kind 'bogus': plan .* stores predictor kinds \['layer'\]", absent=["{d}/out.json"]),
    c("simulate --num-experts 16 with an 8-expert plan (finding 4)", [*S, "--plan", "{g}/plan", "--num-experts", "16"], 2, r"--num-experts 16 but the plan .*plan was made for 8 experts"),
    c("simulate a 16-expert plan on 8-expert traces (finding 4)", [*S, "--ep", "2", "--tokens-per-rank", "4", "--plan", "{g}/plan16"], 1, r"good\.npz: the file records num_experts=8 but 16 was given", absent=["{d}/out.json"]),
    c("simulate too few tokens", [*S, "--ep", "8", "--tokens-per-rank", "64"], 2, r"--traces hold 96 tokens, fewer than one step of EP 8 x --tokens-per-rank 64 = 512 -- lower --tokens-per-rank", absent=["{d}/out.json"]),
    c("simulate --cluster bogus", [*S, "--cluster", "bogus"], 2, r"argument --cluster: invalid choice", argparse=True),
    c("simulate --fit-traces missing", [*S, "--ep", "2", "--tokens-per-rank", "4", "--predictor", "layer", "--fit-traces", "{d}/nope.npz"], 1, r"nope\.npz: no such file"),
    # -- specmoe evaluate
    c("evaluate --batch 0", [*V, "--batch", "0"], 2, r"--batch 0: must be >= 1 -- give the tokens per shuffle domain"),
    c("evaluate --batch -1", [*V, "--batch", "-1"], 2, r"--batch -1: must be >= 1"),
    c("evaluate --assignment bogus", [*V, "--assignment", "bogus"], 2, r"--assignment 'bogus' is not a method -- choose one of"),
    c("evaluate --kind bogus", [*V, "--kind", "history"], 2, r"--kind 'history': plan .* stores the predictors \['layer'\]"),
    c("evaluate a plan without predictor", ["evaluate", "--plan", "{g}/plan_nopred", "--traces", "{g}/good.npz"], 1, r"plan_nopred stores no predictor -- make it with `specmoe plan --predictor KIND`"),
    c("evaluate --num-experts 16 vs the plan's 8 (finding 4)", [*V, "--num-experts", "16"], 2, r"--num-experts 16 but the plan .*plan was made for 8 experts"),
    c("evaluate a 16-expert plan on 8-expert traces (finding 4)", ["evaluate", "--plan", "{g}/plan16", "--traces", "{g}/good.npz"], 1, r"--traces record 8 experts but the plan .*plan16 was made for 16"),
    c("evaluate a 16-expert plan on JSON traces said to be 8", ["evaluate", "--plan", "{g}/plan16", "--traces", "{g}/good.json", "--num-experts", "8"], 2, r"--num-experts 8 but the plan .*plan16 was made for 16"),
    c("evaluate 2-layer traces on a 3-layer plan", ["evaluate", "--plan", "{g}/plan", "--traces", "{g}/mega", "--num-experts", "8"], 1, r"--plan .*plan does not fit --traces: .*num_layers: the plan was made for num_layers=3 but the run has num_layers=2"),
    c("evaluate --num-experts 0", [*V, "--num-experts", "0"], 2, r"--num-experts 0: out of range"),
    c("evaluate --batch x", [*V, "--batch", "x"], 2, r"argument --batch: invalid int value", argparse=True),
    # -- specmoe recipes
    c("recipes --gpus-per-node 0 (finding 6)", ["recipes", "--model", "mixtral-8x7b", "--gpus-per-node", "0", "--dry-run"], 2, r"--gpus-per-node 0: must be >= 1"),
    c("recipes --gpus-per-node -8 (finding 6)", ["recipes", "--model", "mixtral-8x7b", "--gpus-per-node", "-8", "--dry-run"], 2, r"--gpus-per-node -8: must be >= 1"),
    c("recipes --nodes 0", ["recipes", "--model", "mixtral-8x7b", "--nodes", "0", "--dry-run"], 2, r"--nodes 0: must be >= 1"),
    c("recipes --nodes 3 has no layout", ["recipes", "--model", "mixtral-8x7b", "--nodes", "3", "--dry-run"], 2, r"preset mixtral-8x7b has no layout for 3 node\(s\)"),
    c("recipes --gpus-per-node 3 does not fit the layout", ["recipes", "--model", "mixtral-8x7b", "--gpus-per-node", "3", "--dry-run"], 2, r"Recipe mixtral-8x7b on 1x3: world size 3 is not a multiple"),
    c("recipes no model", ["recipes", "--dry-run"], 2, r"no model chosen -- pass --model NAME"),
    c("recipes megatron recorder with token", ["recipes", "--model", "mixtral-8x7b", "--recorder", "megatron", "--dry-run"], 2, r"predictor 'token' needs token ids"),
    c("recipes predictor request placement cannot use", ["recipes", "--model", "mixtral-8x7b", "--predictor", "history", "--dry-run"], 2, r"predictor 'history': the serve step places requests .* use predictor 'token'"),
    c("recipes --write a file", ["recipes", "--model", "mixtral-8x7b", "--write", "{d}/f"], 2, r"--write .*f: exists and is not a folder", setup=text("f", "x")),
    c("recipes --write in a missing folder", ["recipes", "--model", "mixtral-8x7b", "--write", "{d}/a/b"], 2, r"--write .*b: the folder .*a does not exist", absent=["{d}/a"]),
    c("recipes --model bogus", ["recipes", "--model", "bogus", "--dry-run"], 2, r"argument --model: invalid choice", argparse=True),
    c("recipes neither --dry-run nor --write", ["recipes", "--model", "mixtral-8x7b"], 2, r"one of the arguments --dry-run --write is required", argparse=True),
    # -- specmoe demo (everything refused before a rank starts)
    c("demo --ranks 0 (finding 5)", [*D, "--ranks", "0"], 2, r"--ranks 0: must be >= 1", absent=["{d}/demo"]),
    c("demo --ranks -1", [*D, "--ranks", "-1"], 2, r"--ranks -1: must be >= 1"),
    c("demo --tp 0", [*D, "--tp", "0"], 2, r"--tp 0: must be >= 1"),
    c("demo --ep 0", [*D, "--ep", "0"], 2, r"--ep 0: must be >= 1"),
    c("demo --tp 3", [*D, "--tp", "3"], 2, r"--tp 3 must divide --ranks 4"),
    c("demo --ep 3", [*D, "--ep", "3"], 2, r"--ep 3 must divide --ranks 4"),
    c("demo --ep 2 --tp 4", [*D, "--ep", "2", "--tp", "4"], 2, r"--ep 2 must be a multiple of --tp 4"),
    c("demo --seq 0", [*D, "--seq", "0"], 2, r"--seq 0: must be >= 1"),
    c("demo --batch 0", [*D, "--batch", "0"], 2, r"--batch 0: must be >= 1"),
    c("demo --calib-windows 0", [*D, "--calib-windows", "0"], 2, r"--calib-windows 0: must be >= 1"),
    c("demo --eval-windows -3", [*D, "--eval-windows", "-3"], 2, r"--eval-windows -3: must be >= 1"),
    c("demo --new-tokens without --engine dynamic", [*D, "--new-tokens", "4"], 2, r"--new-tokens is a setting of the dynamic engine's request stream -- add --engine dynamic"),
    c("demo --arrivals without --engine dynamic", [*D, "--arrivals", "1"], 2, r"--arrivals is a setting of the dynamic engine's request stream -- add --engine dynamic"),
    c("demo --engine bogus", [*D, "--engine", "bogus"], 2, r"argument --engine: invalid choice", argparse=True),
    c("demo --repeats 0", [*D, "--repeats", "0"], 2, r"--repeats 0: must be >= 1"),
    c("demo --repeats with --synthetic", [*D, "--synthetic", "--repeats", "2"], 2, r"--repeats sets the timed passes of the static demo .* -- leave out --repeats with --synthetic"),
    c("demo --synthetic --experts 6", [*D, "--synthetic", "--experts", "6"], 2, r"--ep 4 must divide --experts 6"),
    c("demo --synthetic --topk 9", [*D, "--synthetic", "--topk", "9"], 2, r"--topk 9 exceeds --experts 8"),
    c("demo --synthetic --layers 0", [*D, "--synthetic", "--layers", "0"], 2, r"--layers 0: must be >= 1"),
    c("demo --out-dir a file", ["demo", "--out-dir", "{d}/f"], 2, r"--out-dir .*f: exists and is not a folder", setup=text("f", "x")),
    c("demo --json a folder", [*D, "--json", "{d}"], 2, r"--json .*: is a directory, expected a file name"),
    c("demo --figure in a missing folder", [*D, "--figure", "{d}/no/x.png"], 2, r"--figure .*x\.png: the folder .*no does not exist"),
    c("demo --seq beyond the model", [*D, "--seq", "4096"], 2, r"--seq 4096 exceeds the model's sequence length 128"),
    c("demo --ep 3 vs 32 experts", [*D, "--ranks", "3", "--tp", "1", "--ep", "3"], 2, r"--ep 3 does not divide the model's 32 experts"),
    c("demo --calib-text missing", [*D, "--calib-text", "{d}/nope.txt"], 1, r"--calib-text text file .*nope\.txt: no such file"),
    c("demo --calib-text a folder", [*D, "--calib-text", "{d}"], 1, r"--calib-text text file .*: is a directory"),
    c("demo --calib-text a fifo", [*D, "--calib-text", "{d}/p"], 1, r"--calib-text text file .*p: is a FIFO", setup=fifo("p")),
    c("demo --calib-text not utf-8", [*D, "--calib-text", "{d}/b.txt"], 1, r"--calib-text .*b\.txt: not UTF-8 text at byte 0", setup=raw("b.txt", b"\xff\xfe\x00")),
    c("demo --calib-windows below one batch per DP group", [*D, "--calib-windows", "2"], 2, r"--calib-windows 2 is fewer than one batch per DP group \(--batch 4 x 1 DP groups = 4\) -- raise --calib-windows to 4"),
    c("demo --eval-windows below one batch per DP group", [*D, "--ranks", "4", "--tp", "2", "--eval-windows", "5"], 2, r"--eval-windows 5 is fewer than one batch per DP group \(--batch 4 x 2 DP groups = 8\)"),
    c("demo --calib-text too short", [*D, "--calib-text", "{g}/calib.txt"], 2, r"the calibration text has \d+ tokens, \d+ windows of 128; asked for 96 -- lower --calib-windows or --seq"),
]


def _card(edit=None, weights=None, tokenizer=True):
    """{d}/ckpt: the shipped model's card after ``edit(card)``, the weights linked (or ``weights``
    bytes), the tokenizer linked."""
    def make(d, g):
        ck = d / "ckpt"
        ck.mkdir()
        card = json.loads((DATA / "model.json").read_text())
        if edit is not None:
            edit(card)
        (ck / "model.json").write_text(json.dumps(card))
        if weights is None:
            os.symlink(DATA / "model.pt", ck / "model.pt")
        elif weights != "absent":
            weights(ck / "model.pt")
        if tokenizer:
            os.symlink(DATA / "tokenizer.json", ck / "tokenizer.json")
    return make


def _shape(**kv):
    return lambda card: card["shape"].update(kv)


K = [*D, "--checkpoint", "{d}/ckpt"]
CHECKPOINTS = [
    c("checkpoint folder missing", [*D, "--checkpoint", "{d}/nope"], 1, r"nope: no such checkpoint folder -- pass the directory holding model\.json"),
    c("checkpoint folder empty", [*D, "--checkpoint", "{d}/e"], 1, r"e/model\.json: no model card", setup=subdir("e")),
    c("model.json not JSON", K, 1, r"model\.json: not valid JSON .* -- re-save the checkpoint", setup=lambda d, g: (_card()(d, g), (d / "ckpt" / "model.json").write_text("{"))),
    c("model.json not utf-8", K, 1, r"model\.json: not UTF-8 text", setup=lambda d, g: (_card()(d, g), (d / "ckpt" / "model.json").write_bytes(b"\xff"))),
    c("model.json a list", K, 1, r"model\.json: expected a JSON object", setup=lambda d, g: (_card()(d, g), (d / "ckpt" / "model.json").write_text("[]"))),
    c("model.json a fifo", K, 1, r"model\.json: is a FIFO", setup=lambda d, g: (_card()(d, g), (d / "ckpt" / "model.json").unlink(), os.mkfifo(d / "ckpt" / "model.json"))),
    c("card format wrong", K, 1, r"field 'format' is 'x'", setup=_card(lambda k: k.update(format="x"))),
    c("card version wrong", K, 1, r"field 'version' is 99", setup=_card(lambda k: k.update(version=99))),
    c("card without shape", K, 1, r"field 'shape' is missing; the card is incomplete", setup=_card(lambda k: k.pop("shape"))),
    c("card shape unknown key", K, 1, r"field 'shape' has unknown keys \['colour'\]", setup=_card(_shape(colour=1))),
    c("card shape experts string", K, 1, r"\(shape\): field 'experts' should be int, got 'x'", setup=_card(_shape(experts="x"))),
    c("card shape experts 0", K, 1, r"\(shape\): field 'experts' is 0, expected a count >= 1", setup=_card(_shape(experts=0))),
    c("card shape heads bool", K, 1, r"field 'heads' should be int, got True", setup=_card(_shape(heads=True))),
    c("card shape topk float", K, 1, r"field 'topk' should be int, got 4\.0", setup=_card(_shape(topk=4.0))),
    c("card weights_dtype bogus", K, 1, r"field 'weights_dtype' is 'int3'", setup=_card(lambda k: k.update(weights_dtype="int3"))),
    c("card without weights_file", K, 1, r"field 'weights_file' is missing", setup=_card(lambda k: k.pop("weights_file"))),
    c("card config not an object", K, 1, r"field 'config' should be an object", setup=_card(lambda k: k.update(config=[]))),
    c("card eot_id string", K, 1, r"field 'eot_id' should be int", setup=_card(lambda k: k.update(eot_id="0"))),
    c("weights file absent", K, 1, r"weights file \(model\.json field 'weights_file'\) of .*model\.pt: no such file", setup=_card(weights="absent")),
    c("weights file a fifo", K, 1, r"model\.pt: is a FIFO", setup=_card(weights=lambda p: os.mkfifo(p))),
    c("weights sha mismatch", K, 1, r"model\.pt: sha256 does not match model\.json field 'weights_sha256'", setup=_card(weights=lambda p: p.write_bytes(b"not the weights"))),
    c("tokenizer absent", K, 1, r"tokenizer \(model\.json field 'tokenizer_file'\) of .*: .*tokenizer\.json: no such file", setup=_card(tokenizer=False)),
    c("no tokenizer named", K, 1, r"model\.json has no tokenizer_file", setup=_card(lambda k: k.update(tokenizer_file=""))),
]

LAUNCH = [
    c("launch: no script", [], 2, r"no script given -- see `specmoe-launch --help`", entry="specmoe-launch"),
    c("launch: -m alone", ["-m"], 2, r"-m needs a module name", entry="specmoe-launch"),
    c("launch: unknown option", ["--nproc-per-node", "8"], 2, r"unknown option '--nproc-per-node' before the script", entry="specmoe-launch"),
    c("launch: missing script", ["{d}/serve.py"], 2, r"script .*serve\.py does not exist", entry="specmoe-launch"),
    c("launch: script is a folder", ["{d}"], 2, r"does not exist \(or is not a file\)", entry="specmoe-launch"),
]

SERVE = '''
from megatron.training.arguments import parse_args, validate_args
args = parse_args()
validate_args(args, {})
'''
MEG = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "128",
       "--max-position-embeddings", "128", "--micro-batch-size", "1", "--num-experts", "8",
       "--moe-router-topk", "2", "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
       "--expert-tensor-parallel-size", "1", "--sequence-parallel", "--moe-token-dispatcher-type", "specmoe"]


def _script(d, g):
    (d / "serve.py").write_text(SERVE)


def _plan4(edit=None):
    """{d}/plan: a 4-layer, 8-expert, EP 2 plan with a layer predictor (fits MEG)."""
    def make(d, g):
        import numpy as np

        from megatron_specmoe.artifacts.plan_folder import make_plan, save_plan
        from megatron_specmoe.artifacts.traces import RoutingTrace
        from megatron_specmoe.predict.registry import fit_predictor

        rng = np.random.default_rng(0)
        ex = np.stack([np.stack([rng.permutation(8)[:2] for _ in range(4)]) for _ in range(64)])
        pred = fit_predictor("layer", RoutingTrace(experts=ex, num_experts=8), n=1, min_count=1, alpha=1.0)
        save_plan(make_plan(num_layers=4, num_experts=8, topk=2, ep_size=2,
                            predictor_state={"layer": pred.to_state()}), d / "plan")
        _script(d, g)
        if edit is not None:
            edit(d / "plan")
    return make


def L(id, extra, pattern, setup=_script, code=2):
    return c(f"launch flags: {id}", ["{d}/serve.py", *MEG, *extra], code, pattern, setup=setup,
             entry="specmoe-launch", needs=("megatron.training",))


LAUNCH_FLAGS = [
    L("plan folder missing", ["--specmoe-plan", "{d}/nope"], r"--specmoe-plan .*nope: no such directory"),
    L("plan header edited (finding 2)", ["--specmoe-plan", "{d}/plan"], r"--specmoe-plan .*plan: .*header was edited or corrupted", setup=_plan4(edit_header(lambda doc: doc.update(ep_size=4), seal=False))),
    L("plan for another EP size", ["--specmoe-plan", "{d}/plan", "--expert-model-parallel-size", "4"], r"ep_size: the plan was made for ep_size=2 but the run has ep_size=4", setup=_plan4()),
    L("plan for other experts (finding 4)", ["--specmoe-plan", "{d}/plan", "--num-experts", "16"], r"num_experts: the plan was made for num_experts=8 but the run has num_experts=16", setup=_plan4()),
    L("predictor missing from the plan", ["--specmoe-plan", "{d}/plan", "--specmoe-predictor", "token"], r"--specmoe-predictor token: the plan .* holds no such predictor", setup=_plan4()),
    L("EP 1 cannot benefit", ["--expert-model-parallel-size", "1"], r"--expert-model-parallel-size is 1"),
    L("record-every without routes", ["--specmoe-record-every", "5"], r"--specmoe-record-every 5: must be >= 0 and needs --specmoe-record-routes"),
    L("shuffle with transformer_engine", ["--specmoe-shuffle"], r"token shuffling .* with --transformer-impl transformer_engine"),
    L("TP 2 shuffles by default: transformer_engine", [], r"token shuffling \(the specmoe dispatcher shuffles tokens at --tensor-model-parallel-size 2.* --transformer-impl transformer_engine"),
    L("layer predictor has no run-time form", ["--specmoe-plan", "{d}/plan"], r"--specmoe-predictor layer: the n-gram layer table has no run-time form", setup=_plan4()),
]


ALL = FLAGS + CHECKPOINTS + LAUNCH + LAUNCH_FLAGS


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    g = tmp_path_factory.mktemp("good")
    make_good(g)
    return g, snapshot(g)


def _megatron_training():
    import importlib

    if not hasattr(typing, "override"):  # Python 3.11: megatron.training imports typing.override
        import typing_extensions

        typing.override = typing_extensions.override
    try:
        return importlib.import_module("megatron.training.arguments")
    except ImportError as exc:
        pytest.skip(f"megatron.training is not importable here ({exc}); it ships from core 0.19")


@pytest.mark.parametrize("case", ALL, ids=[x.id for x in ALL])
def test_bad_input(case, good, tmp_path, capsys, monkeypatch):
    if "megatron.training" in case.needs:
        A = _megatron_training()
        monkeypatch.setattr(A, "get_device_arch_version", lambda: 9)
        monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setattr(sys, "path", list(sys.path))
        monkeypatch.setattr(sys, "argv", list(sys.argv))
    run_case(case, tmp_path, good[0], good[1], capsys, monkeypatch)


def test_the_corpus_covers_every_command_and_entry_point():
    from test_bad_inputs import CASES

    every = CASES + ALL
    assert len(every) >= 400, len(every)
    commands = {x.argv[0] for x in every if x.entry == "specmoe"}
    assert commands == {"plan", "group", "simulate", "evaluate", "recipes", "demo"}
    assert any(x.entry == "specmoe-launch" for x in every)


# ---- real subprocesses: no traceback end to end, known warnings hidden (finding 12) ---------------
def _run(args, tmp_path, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "SPECMOE_DEBUG")}
    clean["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**clean, **env}, timeout=240)


def test_subprocess_errors_are_one_line(tmp_path):
    (tmp_path / "t.json").write_text('{"0": [[0, 1]], "1": [[1, 9]]}')
    cases = [
        (["-m", "megatron_specmoe", "plan", "--traces", "nope.json", "--ep", "2", "--out", "p"], 1, "specmoe plan: error: trace nope.json: no such file -- check the path"),
        (["-m", "megatron_specmoe", "group", "--traces", "t.json", "--ep", "0", "--out", "g.json"], 2, "specmoe group: error: --ep 0: must be >= 1"),
        (["-m", "megatron_specmoe", "simulate", "--traces", "t.json", "--num-experts", "8", "--tokens-per-rank", "-4"], 2, "specmoe simulate: error: --tokens-per-rank -4: must be >= 1"),
        (["-m", "megatron_specmoe.launch"], 2, "specmoe-launch: error: no script given"),
    ]
    for args, code, start in cases:
        proc = _run(args, tmp_path)
        assert proc.returncode == code, (args, proc.stderr)
        assert proc.stderr.startswith(start) and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    proc = _run(["-m", "megatron_specmoe", "--debug", "group", "--traces", "t.json", "--ep", "0", "--out", "g.json"], tmp_path)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "SpecMoEUsageError" in proc.stderr
    assert not list(tmp_path.glob("*.tmp*")) and not (tmp_path / "g.json").exists()


def test_known_megatron_warnings_are_hidden_and_said_under_verbose(tmp_path):
    """Issue 18 finding 12: every command that imports megatron-core printed five UserWarnings
    ("Transformer Engine and Apex are not installed ...") before its own output."""
    argv = ["-m", "megatron_specmoe", "demo", "--checkpoint", "nowhere"]  # imports megatron.core
    proc = _run(argv, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr  # one line, no warnings
    assert "UserWarning" not in proc.stderr and "nowhere: no such checkpoint folder" in proc.stderr
    proc = _run(["-m", "megatron_specmoe", "--verbose", *argv[2:]], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and "UserWarning" not in proc.stderr, proc.stderr
    assert lines[0].startswith("specmoe demo: --verbose: hid ") and "Transformer Engine and Apex are not installed" in lines[0]
    assert lines[1].startswith("specmoe demo: error: ")  # the error stays the last line


def test_debug_hides_no_warning_and_other_warnings_are_shown(capsys):
    import warnings

    from megatron_specmoe.entry import run_entry

    def body():
        warnings.warn("Transformer Engine and Apex are not installed. Falling back", UserWarning)
        warnings.warn("something else", UserWarning)
        return 0

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert run_entry("specmoe x", body, verbose=True) == 0
    assert [str(w.message) for w in seen] == ["something else"]  # the known one hidden, the other shown
    assert "specmoe x: --verbose: hid 1 known warning(s)" in capsys.readouterr().err
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert run_entry("specmoe x", body, debug=True) == 0
    assert len(seen) == 2  # --debug hides nothing


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="checks the refusal on Python < 3.12")
def test_launcher_on_python_311_says_it_needs_312(tmp_path):
    """Issue 18 finding 11: specmoe-launch cannot run megatron.training on the Python 3.11 that
    tools/setup_env.sh builds; it says so in one line (no shim in this process)."""
    (tmp_path / "serve.py").write_text("print('ran')\n")
    proc = _run(["-m", "megatron_specmoe.launch", "serve.py"], tmp_path)
    assert proc.returncode == 1 and "ran" not in proc.stdout, proc.stderr
    assert proc.stderr.startswith("specmoe-launch: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "needs Python >= 3.12" in proc.stderr and sys.version.split()[0] in proc.stderr

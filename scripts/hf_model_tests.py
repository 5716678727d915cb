"""Run transformers' own model tests with attnkit standing in for ``"sdpa"``, and the same tests
with the real SDPA as control; print a per-family table and the tests that fail only under
attnkit.

transformers' test tree is not in its wheel or sdist: check out the repository (``tests/``,
``conftest.py``, ``pyproject.toml``, and ``src/`` when the installed version has no matching
tree) at the tag nearest the installed version, and point ``--tests-root`` at it::

    PYTHONPATH=. python scripts/hf_model_tests.py --tests-root /work/hf-tests \\
        --pythonpath /work/hf-tests/src:/work/hf-tests/deps:/work/hf-tests/stubs \\
        --families llama,gemma2 --out /tmp/hf-suite

Each family runs ``tests/models/<family>/test_modeling_<family>.py`` once per mode (``control``:
transformers as installed; ``attnkit``: with ``-p hf_suite_plugin``, which registers attnkit's
attention and mask functions under ``"sdpa"``), one family at a time, under ``nice``, with a
per-test timeout when pytest-timeout is installed. Results are kept as junit XML under
``--out`` (``<family>.<mode>.xml``; a rerun skips the runs whose XML exists unless ``--force``),
so ``--table-only`` rebuilds the table from earlier runs. Test-only needs: ``parameterized``
(and ``pytest-timeout``); the test tree's pipeline modules import ``datasets`` at module level
(a stub package whose ``load_dataset`` raises does: every use needs the hub). transformers 5.16's
``src/`` needs ``huggingface_hub<2`` (and ``httpx``), e.g. ``pip install --target DEPS``.

Before/after: run the same families a second time with an older attnkit first on the path
(``--pythonpath ...:/path/to/old/tree``; the plugin handles the old single-module
``attnkit/attn/hf.py``) into another folder, then
``--table-only --out AFTER --before BEFORE`` prints both side by side (docs/hf-suite-results.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: The families of issue 17, fast ones first (measured on 2 CPU cores).
FAMILIES = (
    "gpt2", "bert", "roberta", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma",
    "phi3", "granite", "olmo2", "starcoder2", "cohere", "modernbert", "bart", "gemma2",
    "gemma3", "mixtral", "deepseek_v3", "t5gemma", "gpt_oss", "falcon", "t5",
)
MODES = ("control", "attnkit")
#: Families whose models decline SDPA only for what attnkit has (gpt-oss: sinks); their attnkit
#: run declares SDPA support (see hf_suite_plugin), so the SDPA tests reach attnkit.
CLAIM_SDPA = {"gpt_oss": "transformers.models.gpt_oss.modeling_gpt_oss"}
#: Deselected by default: integration classes (hub checkpoints); the distributed mixins (FSDP,
#: tensor / expert parallel: 45-140 s a test on 2 cores, one process), which an attention function
#: does not change; torch.export and torch.compile tests (a compile per test: 5-330 s each on 2
#: cores; ``--compile`` keeps them, with the 2-minute overfitting run of the training mixin).
DEFAULT_K = ("not slow and not integration and not Integration and not fsdp and not test_tp_ "
             "and not test_ep_ and not torch_export")
NO_COMPILE_K = " and not compil and not test_static_cache_no_recompile and not training_overfit"


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tests-root", required=True, type=Path,
                   help="a checkout of transformers holding tests/ and conftest.py")
    p.add_argument("--pythonpath", default="",
                   help="paths put first on PYTHONPATH (e.g. the checkout's src/ when its version "
                        "differs from the installed one, and test-only packages)")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated family names")
    p.add_argument("--modes", default="attnkit,control", help="control, attnkit or both")
    p.add_argument("--control", choices=("failed", "full"), default="failed",
                   help="failed (default): the control run repeats only the tests that failed "
                        "under attnkit (half the CPU time); full: the whole file")
    p.add_argument("--out", type=Path, default=Path("hf-suite-results"), help="result folder")
    p.add_argument("-k", dest="k", default=DEFAULT_K, help="pytest -k expression")
    p.add_argument("--compile", action="store_true",
                   help="keep the torch.compile tests (deselected by default: slow on a CPU)")
    p.add_argument("--timeout", type=int, default=120, help="per-test timeout, seconds")
    p.add_argument("--nice", type=int, default=15, help="niceness of the pytest runs")
    p.add_argument("--force", action="store_true", help="rerun even where results exist")
    p.add_argument("--table-only", action="store_true", help="only print the table from --out")
    p.add_argument("--before", type=Path, default=None,
                   help="with --table-only: a result folder of the same families at an older "
                        "attnkit (--pythonpath putting that tree first); print a before/after "
                        "table, --out being the after")
    a = p.parse_args(argv)
    if not a.compile:
        a.k += NO_COMPILE_K
    a.families = [f for f in a.families.split(",") if f]
    a.modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in a.modes if m not in MODES]
    if bad:
        p.error(f"--modes: {bad[0]!r} is not one of {', '.join(MODES)}")
    if not (a.tests_root / "tests" / "models").is_dir():
        p.error(f"--tests-root: {a.tests_root} has no tests/models folder")
    return a


def run_family(a, family: str, mode: str) -> None:
    test = a.tests_root / "tests" / "models" / family / f"test_modeling_{family}.py"
    xml = a.out / f"{family}.{mode}.xml"
    if not test.is_file():
        print(f"  {family}: no {test.relative_to(a.tests_root)} in this tree", flush=True)
        return
    if xml.exists() and not a.force:
        return
    targets = [str(test)]
    if mode == "control" and a.control == "failed" and "attnkit" in a.modes:
        akxml = a.out / f"{family}.attnkit.xml"
        if not akxml.exists():
            return
        failed = [t for t, (o, _) in parse(akxml).items() if o == "fail"]
        # classname is tests.models.<family>.test_modeling_<family>.<Class>
        targets = [f"{test}::{t.rsplit('.', 1)[-1]}" for t in failed]
        if not targets:
            (a.out / f"{family}.control.xml").write_text("<testsuites/>")
            return
    cmd = ["nice", "-n", str(a.nice), sys.executable, "-m", "pytest", *targets, "-q",
           "-p", "no:cacheprovider", "-o", "addopts=", f"--junitxml={xml}", "-k", a.k]
    # one thread: the tiny test models gain nothing from more, and the machine is shared
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    paths = [p for p in a.pythonpath.split(os.pathsep) if p] + [str(ROOT), str(HERE)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd.append(f"--timeout={a.timeout}")
    if mode == "attnkit":
        cmd += ["-p", "hf_suite_plugin"]
        env["ATTNKIT_SUITE_COUNTS"] = str(a.out / f"{family}.counts.json")
        if family in CLAIM_SDPA:
            env["ATTNKIT_SUITE_CLAIM_SDPA"] = CLAIM_SDPA[family]
    t0 = time.time()
    log = a.out / f"{family}.{mode}.log"
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=a.tests_root, env=env, stdout=f, stderr=subprocess.STDOUT)
    (a.out / f"{family}.{mode}.time").write_text(f"{time.time() - t0:.0f}\n")
    print(f"  {family} [{mode}]: {time.time() - t0:.0f} s", flush=True)


def parse(xml: Path) -> dict[str, tuple[str, str]]:
    """``{test id: (outcome, first message line)}``, outcome ``pass``/``fail``/``skip``."""
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        tid = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, msg = "pass", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "fail"
                text = child.get("message") or child.text or ""
                msg = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
                break
            if child.tag == "skipped":
                outcome = "skip"
        out[tid] = (outcome, msg[:200])
    return out


def _counts(res: dict) -> tuple[int, int, int]:
    vals = [o for o, _ in res.values()]
    return vals.count("pass"), vals.count("fail"), vals.count("skip")


def table(a) -> str:
    """Markdown: per family, attnkit's pass / fail / skip, how many of its failures also fail
    under the real SDPA, how many fail only under attnkit, the control's own counts (when it ran
    the whole file), and attnkit's attention calls; then each attnkit-only failure."""
    rows = ["| family | attnkit pass / fail / skip | also fail under sdpa | fail only under "
            "attnkit | sdpa pass / fail / skip (full runs) | attnkit calls (to sdpa) |",
            "|---|---|---|---|---|---|"]
    details, tot = [], [0] * 5
    for fam in a.families:
        ak_xml, ctl_xml = a.out / f"{fam}.attnkit.xml", a.out / f"{fam}.control.xml"
        if not ak_xml.exists():
            continue
        ak = parse(ak_xml)
        ctl = parse(ctl_xml) if ctl_xml.exists() else None
        p, f, k = _counts(ak)
        fails = [(t, m) for t, (o, m) in ak.items() if o == "fail"]
        if ctl is None:
            both, only, only_cell, both_cell = [], [], "control not run", "-"
        else:
            both = [t for t, _ in fails if ctl.get(t, ("?", ""))[0] == "fail"]
            # a test the control did not run (deselected by a later, narrower -k) is no evidence
            only = [(t, m) for t, m in fails if ctl.get(t, ("?", ""))[0] in ("pass", "skip")]
            unknown = [(t, m) for t, m in fails if t not in ctl]
            details += [f"- {fam}: `{t.split('.')[-1]}` (not rerun under sdpa) — {m}"
                        for t, m in sorted(unknown)]
            only_cell, both_cell = str(len(only)), str(len(both))
        full = ctl is not None and len(ctl) > len(fails)
        ctl_cell = " / ".join(map(str, _counts(ctl))) if full else "-"
        cfile = a.out / f"{fam}.counts.json"
        calls = json.loads(cfile.read_text()) if cfile.exists() else {}
        call_cell = f"{calls.get('calls', 0)} ({calls.get('handed_to_sdpa', 0)})" if calls else "-"
        rows.append(f"| {fam} | {p} / {f} / {k} | {both_cell} | {only_cell} | {ctl_cell} "
                    f"| {call_cell} |")
        for i, x in enumerate((p, f, k, len(both), len(only))):
            tot[i] += x
        details += [f"- {fam}: `{t.split('.')[-1]}` — {m}" for t, m in sorted(only)]
    rows.append(f"| **total** | {tot[0]} / {tot[1]} / {tot[2]} | {tot[3]} | {tot[4]} | | |")
    return "\n".join(rows) + "\n\nFailing only under attnkit:\n" + ("\n".join(details) or "- none")


def _summary(out: Path, fam: str) -> dict | None:
    """One family's attnkit run in ``out``: counts, the failures also seen under sdpa (``both``),
    the ones only attnkit has (``only``: test id -> message), the calls file."""
    ak_xml, ctl_xml = out / f"{fam}.attnkit.xml", out / f"{fam}.control.xml"
    if not ak_xml.exists():
        return None
    ak = parse(ak_xml)
    ctl = parse(ctl_xml) if ctl_xml.exists() else None
    fails = {t: m for t, (o, m) in ak.items() if o == "fail"}
    res = dict(counts=_counts(ak), fails=fails, control=ctl, both=None, only=None)
    if ctl is not None:
        res["both"] = [t for t in fails if ctl.get(t, ("?", ""))[0] == "fail"]
        res["only"] = {t: m for t, m in fails.items()
                       if ctl.get(t, ("?", ""))[0] in ("pass", "skip")}
    cfile = out / f"{fam}.counts.json"
    res["calls"] = json.loads(cfile.read_text()) if cfile.exists() else None
    return res


def _cell(s: dict | None) -> str:
    if s is None:
        return "not run"
    p, f, k = s["counts"]
    only = "?" if s["only"] is None else len(s["only"])
    return f"{p} / {f} / {k} ({only})"


def compare(a) -> str:
    """Markdown: per family, attnkit's pass / fail / skip before and after (in brackets: the
    failures only attnkit has), what the real SDPA gave on the tests attnkit failed (failures /
    tests rerun, before; after), and attnkit's calls after; then the attnkit-only failures after,
    and the ones fixed since before."""
    rows = ["| family | before: attnkit pass / fail / skip (only under attnkit) | after: attnkit "
            "pass / fail / skip (only under attnkit) | sdpa on those tests: fail / rerun "
            "(before; after) | attnkit calls after (handed to sdpa) |", "|---|---|---|---|---|"]
    left, fixed, tot = [], [], [0, 0]
    sums = [[0, 0, 0], [0, 0, 0]]
    for fam in a.families:
        b, af = _summary(a.before, fam), _summary(a.out, fam)
        if b is None and af is None:
            continue

        def ctl(s):
            if s is None or s["control"] is None:
                return "-"
            return f"{len(s['both'])} / {len(s['fails'])}"

        calls = (af or {}).get("calls")
        call_cell = f"{calls.get('calls', 0)} ({calls.get('handed_to_sdpa', 0)})" if calls else "-"
        rows.append(f"| {fam} | {_cell(b)} | {_cell(af)} | {ctl(b)}; {ctl(af)} | {call_cell} |")
        for i, s in enumerate((b, af)):
            tot[i] += len(s["only"] or {}) if s else 0
            for j in range(3):
                sums[i][j] += s["counts"][j] if s else 0
        if af and af["only"]:
            left += [f"- {fam}: `{t.split('.')[-1]}` — {m}" for t, m in sorted(af["only"].items())]
        if b and b["only"] and af:
            gone = sorted(t for t in b["only"] if af["fails"].get(t) is None)
            fixed += [f"- {fam} ({len(gone)}): " + ", ".join(f"`{t.split('::')[-1]}`" for t in gone)]
    cells = [" / ".join(map(str, x)) + f" ({t})" for x, t in zip(sums, tot, strict=True)]
    rows.append(f"| **total** | {cells[0]} | {cells[1]} | | |")
    return ("\n".join(rows) + "\n\nFailing only under attnkit, after:\n" + ("\n".join(left) or "- none")
            + "\n\nFailing only under attnkit before, passing after:\n" + ("\n".join(fixed) or "- none"))


def main(argv=None) -> int:
    a = _args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.table_only:
        for fam in a.families:
            for mode in a.modes:
                run_family(a, fam, mode)
    print(compare(a) if a.before is not None else table(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())

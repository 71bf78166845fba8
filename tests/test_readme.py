"""The README's usage example prints what the README says it prints (all but the seconds):
its output is the first thing a user compares against, and it went stale once unnoticed."""

import re
from pathlib import Path

import slt
from slt import zoo

README = Path(__file__).resolve().parents[1] / "README.md"
INTRO = "prints, for a 10-parameter linear regression (λ = d/2 = 5):"


def _printed_block() -> list[str]:
    text = README.read_text()
    after = text[text.index(INTRO) + len(INTRO) :]
    block = re.search(r"```\n(.*?)```", after, re.S)
    return block.group(1).rstrip("\n").splitlines()


def _without_seconds(line: str) -> str:
    return re.sub(r"\d+(\.\d+)? s$", "<seconds> s", line)


def test_usage_example_prints_what_the_readme_shows():
    case = zoo.regular(10)  # the README's 10-parameter linear regression
    res = slt.estimate_llc(case.model, case.loader(), case.loss_fn, step_size=5e-5,
                           localization=1.0, num_chains=4, num_draws=1500, num_burnin=500,
                           seed=0, progress=False)  # fmt: skip
    expected = [_without_seconds(line) for line in _printed_block()]
    assert [_without_seconds(line) for line in str(res).splitlines()] == expected

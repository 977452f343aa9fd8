"""Arithmetic: does the description of the activation at "a op b = " state the answer?

Prompts are `f"{a} {op} {b} = "` (ops + - *), with answers of 1, 2 and 3 digits (non-negative,
never equal to an operand, so restating the problem never counts as knowing the answer). The
activation is the target's read layer at the last token: the trailing space, just before the
answer would be written.

Per answer length, over all problems:
- exact match:  the answer appears as a number in the description (numbers = `\\d+` runs with
                thousands commas removed; "12" does not match inside "123");
- first digit:  the first number in the description that is not an operand starts with the
                answer's first digit (a description without such a number is a miss);
- states_number: share of descriptions that state any number other than the operands.
Upper reference: a multinomial logistic-regression probe on the same activations for the answer's
first digit (0-9), trained on half the problems (stratified by answer length), tested on the rest.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cycle_oracle.evals.oracle import describe_items
from cycle_oracle.evals.probes import accuracy_block, fit_vector_probe

_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)|\d+")


@dataclass(frozen=True)
class Problem:
    a: int
    op: str
    b: int
    answer: int

    @property
    def prompt(self) -> str:
        return f"{self.a} {self.op} {self.b} = "

    @property
    def digits(self) -> int:
        return len(str(self.answer))


def _apply(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def make_problems(n_per_digits: int = 20, seed: int = 0, ops: Sequence[str] = ("+", "-", "*"), digits: Sequence[int] = (1, 2, 3)) -> list[Problem]:
    """n_per_digits distinct problems for each answer length in `digits` (seeded rejection sampling)."""
    rng = random.Random(seed)
    out: list[Problem] = []
    for n_digits in digits:
        hi = 10**n_digits - 1
        seen: set[tuple] = set()
        tries = 0
        while len(seen) < n_per_digits:
            tries += 1
            if tries > 200_000:
                raise RuntimeError(f"could not draw {n_per_digits} distinct {n_digits}-digit arithmetic problems")
            op = rng.choice(list(ops))
            a, b = rng.randint(0, hi), rng.randint(0, hi)
            if op == "*":
                b = rng.randint(0, 9 if n_digits < 3 else 99)
            ans = _apply(a, op, b)
            if ans < 0 or len(str(ans)) != n_digits or ans in (a, b) or (a, op, b) in seen:
                continue
            seen.add((a, op, b))
            out.append(Problem(a, op, b, ans))
    return out


def numbers_in(text: str) -> list[str]:
    """Digit runs in text, thousands separators removed: "1,234 and 56" -> ["1234", "56"]."""
    return [m.replace(",", "") for m in _NUMBER.findall(text or "")]


def states_answer(description: str, problem: Problem) -> bool:
    return str(problem.answer) in {str(int(x)) for x in numbers_in(description)}


def first_stated_number(description: str, problem: Problem) -> str | None:
    operands = {str(problem.a), str(problem.b)}
    for num in numbers_in(description):
        if str(int(num)) not in operands:
            return num
    return None


def first_digit_match(description: str, problem: Problem) -> bool:
    num = first_stated_number(description, problem)
    return num is not None and str(int(num))[0] == str(problem.answer)[0]


def _split(problems: Sequence[Problem], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    train, test = [], []
    for nd in sorted({p.digits for p in problems}):
        idx = [i for i, p in enumerate(problems) if p.digits == nd]
        rng.shuffle(idx)
        k = round(len(idx) * test_fraction)
        test += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(test)


def evaluate_arithmetic(oracle, n_per_digits: int = 20, seed: int = 0, ops: Sequence[str] = ("+", "-", "*"), test_fraction: float = 0.5, examples: int = 5) -> dict:
    problems = make_problems(n_per_digits, seed, ops)
    vectors = oracle.read([p.prompt for p in problems], "last")
    descriptions = describe_items(oracle, vectors, [p.prompt for p in problems])
    exact = [states_answer(d, p) for d, p in zip(descriptions, problems)]
    first = [first_digit_match(d, p) for d, p in zip(descriptions, problems)]
    stated = [first_stated_number(d, p) is not None for d, p in zip(descriptions, problems)]
    by_digits = {}
    for nd in sorted({p.digits for p in problems}):
        idx = [i for i, p in enumerate(problems) if p.digits == nd]
        ones = [1] * len(idx)
        by_digits[str(nd)] = {
            "n": len(idx),
            "exact_match": accuracy_block([int(exact[i]) for i in idx], ones),
            "first_digit": accuracy_block([int(first[i]) for i in idx], ones),
            "states_number": sum(stated[i] for i in idx) / len(idx),
        }
    train, test = _split(problems, test_fraction, seed)
    first_digits = np.array([int(str(p.answer)[0]) for p in problems])
    probe_block: dict
    if len(set(first_digits[train].tolist())) >= 2:
        probe = fit_vector_probe(vectors[train], first_digits[train], seed)
        probe_block = accuracy_block(probe.predict(vectors[test].numpy()), first_digits[test])
    else:
        probe_block = {"accuracy": None, "note": "training split has a single first digit"}
    values, counts = np.unique(first_digits[train], return_counts=True)
    majority = int(values[counts.argmax()])
    probe_block["majority_baseline"] = accuracy_block([majority] * len(test), first_digits[test])["accuracy"]
    probe_block["n_train"], probe_block["n_test"] = len(train), len(test)
    ones = [1] * len(problems)
    return {
        "n": len(problems),
        "ops": list(ops),
        "overall": {"exact_match": accuracy_block([int(x) for x in exact], ones), "first_digit": accuracy_block([int(x) for x in first], ones),
                    "states_number": sum(stated) / len(stated)},
        "by_digits": by_digits,
        "probe_first_digit": probe_block,
        "examples": [{"prompt": p.prompt, "answer": p.answer, "description": d} for p, d in list(zip(problems, descriptions))[:examples]],
        "items": [{"prompt": p.prompt, "answer": p.answer, "description": d, "exact": e, "first_digit": f}
                  for p, d, e, f in zip(problems, descriptions, exact, first)],
    }

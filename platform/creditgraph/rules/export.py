"""Rule sets as text, SQL ``WHERE`` clauses and pandas queries that select the flagged rows.

The SQL and pandas forms select exactly the rows ``RuleSet.predict`` flags: comparisons are
false on NULL/NaN (SQL three-valued logic never turns a NULL comparison into a match because
no rule is ever negated), and ``or is missing`` is spelled out where a rule allows it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from creditgraph.rules.rule import Condition, Rule, RuleSet, format_number
from creditgraph.utils.io import atomic_file, write_json

# A condition that is false on every row, for an empty rule set.
SQL_FALSE = "1 = 0"
QUERY_FALSE = "index != index"


def _sql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _query_ident(name: str) -> str:
    if "`" in name:
        raise ValueError(f"column name {name!r} contains a backtick; pandas query cannot quote it")
    return f"`{name}`"


def condition_sql(c: Condition) -> str:
    col = _sql_ident(c.feature)
    if c.op == "is missing":
        return f"{col} IS NULL"
    if c.op == "is not missing":
        return f"{col} IS NOT NULL"
    cmp = f"{col} {c.op} {format_number(c.threshold)}"
    return f"({cmp} OR {col} IS NULL)" if c.include_missing else cmp


def condition_query(c: Condition) -> str:
    col = _query_ident(c.feature)
    # NaN is the only value not equal to itself: the pandas spelling of IS NULL.
    if c.op == "is missing":
        return f"({col} != {col})"
    if c.op == "is not missing":
        return f"({col} == {col})"
    cmp = f"{col} {c.op} {format_number(c.threshold)}"
    return f"({cmp} or {col} != {col})" if c.include_missing else f"({cmp})"


def rule_sql(rule: Rule) -> str:
    return "(" + " AND ".join(condition_sql(c) for c in rule.conditions) + ")"


def rule_query(rule: Rule) -> str:
    return "(" + " and ".join(condition_query(c) for c in rule.conditions) + ")"


def sql_where(rs: RuleSet) -> str:
    """The body of a ``WHERE`` clause (one rule per line) selecting the flagged rows."""
    if not rs.rules:
        return SQL_FALSE
    return "\n   OR ".join(rule_sql(r) for r in rs.rules)


def pandas_query(rs: RuleSet) -> str:
    """A ``DataFrame.query`` expression selecting the flagged rows."""
    if not rs.rules:
        return QUERY_FALSE
    return " or ".join(rule_query(r) for r in rs.rules)


def _stats_text(stats: dict[str, float]) -> str:
    parts = []
    if "support" in stats:
        parts.append(f"support {int(stats['support'])}")
    if "confidence" in stats:
        parts.append(f"confidence {stats['confidence']:.3f}")
    return f"  [{', '.join(parts)}]" if parts else ""


def ruleset_text(rs: RuleSet) -> str:
    """Human-readable listing: one ``IF`` line per rule, first match wins."""
    head = f"flag {rs.target} = 1 when any rule fires"
    if rs.min_confidence is not None:
        head += f" (confidence constraint {rs.min_confidence:g})"
    if not rs.rules:
        return head + "\n  (no rule set meets the constraint: nothing is flagged)\n"
    lines = [head]
    lines += [f"  {r.name}: IF {r.text}{_stats_text(r.stats)}" for r in rs.rules]
    return "\n".join(lines) + "\n"


def write_exports(rs: RuleSet, out: str | Path, summary: dict[str, Any] | None = None) -> None:
    """Write ``rules.json``, ``rules.sql``, ``rules.txt`` (and ``summary.json``) into ``out``.

    ``out`` is expected to be a fresh directory (callers wrap this in ``atomic_dir``).
    """
    out = Path(out)
    rs.save(out / "rules.json")
    with atomic_file(out / "rules.sql") as fh:
        fh.write(f"-- rows flagged by the rule set (target {rs.target})\n")
        fh.write(f"WHERE {sql_where(rs)}\n")
    with atomic_file(out / "rules.txt") as fh:
        fh.write(ruleset_text(rs))
        fh.write("\npandas query:\n" + pandas_query(rs) + "\n")
    if summary is not None:
        write_json(out / "summary.json", summary)

"""The docs name only commands, options, config keys, files and defaults that exist.

README.md, docs/*.md and bench/README.md are read as a user would run them: every
`ccurate ...` command line (code blocks and inline code) must resolve to a command of
the CLI and use only its options, every `[section] key` must be a config field, the
documented defaults must be the code's, the README's commented-out TOML settings must
load, and every repository file a doc names must exist. Parsing is structural (code
spans, tables), never of prose, so rewording a sentence does not break these tests.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from ccurate.cli import EXIT_CONFIG, EXIT_ERROR, EXIT_LOCKED, EXIT_NOT_READY, app
from ccurate.config import PipelineConfig, parse_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    ROOT / "README.md",
    ROOT / "docs" / "rebuilds.md",
    ROOT / "docs" / "scale.md",
    ROOT / "docs" / "spine.md",
    ROOT / "bench" / "README.md",
]
# files with shell lines that run `ccurate` (recipes and units, not markdown)
SHELL_FILES = [ROOT / "Makefile", *sorted((ROOT / "deploy").glob("*.service"))]
REPO_DIRS = {
    "ccurate", "ingest", "filters", "captioning", "shards", "train", "tests", "docs",
    "deploy", "bench", "tools",
}  # fmt: skip
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def _fenced_and_indented(text: str) -> tuple[list[str], str]:
    """(code lines, the text without fenced blocks). Indented blocks: 4 spaces after a
    blank line (scale.md's style); list continuations are indented less."""
    lines = [ln for block in FENCE.findall(text) for ln in block.splitlines()]
    rest = FENCE.sub("", text)
    prev_blank = False
    in_block = False
    for ln in rest.splitlines():
        if ln.startswith("    ") and (prev_blank or in_block) and ln.strip():
            lines.append(ln.strip())
            in_block = True
        elif ln.strip():
            in_block = False
        prev_blank = not ln.strip()
    return lines, rest


def _spans(text: str) -> list[str]:
    """Inline code spans outside fenced blocks (`\\|` in tables unescaped)."""
    rest = FENCE.sub("", text)
    return [s.replace("\\|", "|") for s in re.findall(r"`([^`\n]+)`", rest)]


def _snippets() -> Iterator[tuple[str, str]]:
    """(where, snippet): every code line and inline code span of the docs, plus the
    shell lines of the Makefile and the systemd units."""
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        lines, _ = _fenced_and_indented(text)
        for ln in lines:
            yield doc.name, ln
        for span in _spans(text):
            yield doc.name, span
    for f in SHELL_FILES:
        for ln in f.read_text(encoding="utf-8").splitlines():
            yield f.name, ln.split("=", 1)[1] if ln.startswith("ExecStart=") else ln


def _ccurate_invocations() -> list[tuple[str, list[str]]]:
    """(where, argv after `ccurate`) of every shell segment whose program is ccurate."""
    found = []
    for where, snippet in _snippets():
        if snippet.lstrip().startswith("#"):
            continue
        code = re.split(r"(?:^|\s)#", snippet, maxsplit=1)[0]  # a shell comment
        for segment in re.split(r"\s*(?:&&|\|\||;|\||>>|>|\$\()\s*", code):
            words = segment.split()
            while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
                words.pop(0)
            if words and words[0] in ("sudo", "exec"):
                words.pop(0)
            if words and (words[0] == "ccurate" or words[0].endswith("/ccurate")):
                found.append((where, words[1:]))
    return found


def _root() -> Any:
    """The click group behind the Typer app (typer vendors its own click)."""
    cmd = typer.main.get_command(app)
    assert hasattr(cmd, "commands")
    return cmd


def _options(cmd: Any) -> set[str]:
    opts = {"--help", "-h"}
    for p in cmd.params:
        opts.update(p.opts)
        opts.update(p.secondary_opts)
    return opts


def _resolve(argv: list[str]) -> tuple[Any, list[str], str]:
    """The command argv names, its remaining words, and an error ('' when it resolves)."""
    cmd = _root()
    words = list(argv)
    while hasattr(cmd, "commands") and words:
        word = words[0].strip("[]()`,")
        if word.startswith("-") or not re.fullmatch(r"[a-z][a-z/-]*", word):
            break  # an option, or a placeholder (CONFIG, COMMAND): stop descending
        names = word.split("/")  # `takedown add/list`
        missing = [n for n in names if n not in cmd.commands]
        if missing:
            default = getattr(cmd, "default_command", None)
            if default and "/" not in word and "." in word:  # `ccurate train cfg.toml`
                cmd = cmd.commands[default]
                break
            return cmd, words, f"no command {' '.join(missing)!r} in {cmd.name!r}"
        cmd = cmd.commands[names[0]]
        words.pop(0)
    return cmd, words, ""


def test_doc_commands_exist_with_the_options_they_use() -> None:
    invocations = _ccurate_invocations()
    # the docs do run ccurate: a broken extractor must not pass vacuously
    assert len(invocations) > 20, invocations
    problems = []
    for where, argv in invocations:
        cmd, rest, error = _resolve(argv)
        if error:
            problems.append(f"{where}: ccurate {' '.join(argv)}: {error}")
            continue
        opts = _options(cmd)
        if rest and not hasattr(cmd, "commands"):  # a full command line, not just a name
            given = {w.strip("[](),`").split("=", 1)[0] for w in rest}
            required = [
                p.opts for p in cmd.params if p.required and p.opts[0].startswith("-")
            ]  # fmt: skip
            for names in required:
                if not given & set(names):
                    problems.append(f"{where}: ccurate {' '.join(argv)}: needs {names[0]}")
        for word in rest:
            opt = word.strip("[](),`").split("=", 1)[0]
            if opt.startswith("-") and len(opt) > 1 and opt not in opts:
                problems.append(f"{where}: ccurate {' '.join(argv)}: {cmd.name} has no {opt}")
    assert not problems, "\n".join(problems)


def test_readme_names_every_command() -> None:
    """Every command `ccurate --help` lists is in the README's command table (as
    `ccurate CMD ...`, or as `CMD ...` beside another command, like `stats`)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    named = {argv[0] for where, argv in _ccurate_invocations() if where == "README.md" and argv}
    named |= {span.split()[0] for span in _spans(readme)}
    root = _root()
    missing = set(root.commands) - named
    assert not missing, f"commands the README does not name: {sorted(missing)}"
    for name, cmd in root.commands.items():  # and `ccurate --help` says what each does
        assert (cmd.help or cmd.short_help or "").strip(), name


def test_train_config_runs_the_default_command() -> None:
    """README: `ccurate train CONFIG`. It reaches the train step's config loading (exit 2
    for a missing file), not a 'no such command' usage error."""
    res = CliRunner().invoke(app, ["train", "no-such-config.toml"])
    assert res.exit_code == EXIT_CONFIG
    assert "config file not found" in res.output, res.output


def test_export_needs_out() -> None:
    """README's `ccurate export RELEASE --out DIR`: --out is required."""
    export = _root().commands["export"]
    out = next(p for p in export.params if "--out" in p.opts)
    assert out.required


# ------------------------------------------------------------------ config keys


def _section(path: str) -> Any:
    obj: Any = PipelineConfig()
    for part in path.split("."):
        assert hasattr(obj, part), f"no config section [{path}]"
        obj = getattr(obj, part)
    return obj


def test_section_keys_named_in_the_docs_exist() -> None:
    problems = []
    seen = 0
    for where, span in _snippets():
        if where.endswith((".service", "Makefile")) or span.lstrip().startswith("#"):
            continue
        for table, key in re.findall(r"^\[([a-z_]+(?:\.[a-z_]+)*)\]\s+([a-z_]+)\b", span):
            seen += 1
            try:
                section = _section(table)
            except AssertionError as e:
                problems.append(f"{where}: {e}")
                continue
            if key not in type(section).model_fields:
                problems.append(f"{where}: [{table}] has no key {key!r}")
    assert seen > 10
    assert not problems, "\n".join(problems)


def _toml_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```toml\n(.*?)^```", text, re.S | re.M)


ASSIGN = re.compile(r"^#\s*([a-z_]+\s*=\s*.+)$")


def _commented_settings() -> Iterator[tuple[str, int, str, str, bool]]:
    """(block, table index, table, 'k = v' lines, whether the comment calls them defaults)
    for every commented-out assignment of the README's TOML blocks."""
    for block in _toml_blocks():
        table, n_sources = "", 0
        after_assignment: list[str] = []  # comment lines since the last assignment
        for raw in block.splitlines():
            line = raw.strip()
            header = re.match(r"^\[\[?([a-z_.]+)\]\]?", line)
            if header:
                table = header.group(1)
                n_sources += line.startswith("[[sources]]")
                after_assignment = []
                continue
            comment = line.split("#", 1)[1].strip() if "#" in line else ""
            if not line.startswith("#"):
                after_assignment = []
                continue
            m = ASSIGN.match(line)
            if not m:
                after_assignment.append(comment)
                continue
            code = re.split(r"\s+#", m.group(1), maxsplit=1)[0]
            parts = re.split(r",\s*(?=[a-z_]+\s*=)", code)
            default = any("default" in c for c in after_assignment)
            yield block, n_sources - 1, table, "\n".join(parts), default
            trailing = re.split(r"\s+#\s*", m.group(1), maxsplit=1)
            if len(trailing) > 1 and trailing[1].startswith("brings "):
                brought = re.split(r",\s*(?=[a-z_]+\s*=)", trailing[1].removeprefix("brings "))
                yield block, n_sources - 1, table, "\n".join(parts + brought), True
            after_assignment = []


def _with(block: str, index: int, table: str, values: dict[str, Any]) -> dict[str, Any]:
    data = tomllib.loads(block)
    if table == "sources":
        data["sources"][index].update(values)
        return data
    node = data
    for part in table.split("."):
        node = node.setdefault(part, {})
    node.update(values)
    return data


def test_readme_commented_out_settings_load() -> None:
    """`# executor = "ray"`, `# format = "auto"` and the like: uncommented, the README's
    examples still load (the keys exist, the values are valid)."""
    checked = 0
    for block, index, table, assignments, _ in _commented_settings():
        parse_config(_with(block, index, table, tomllib.loads(assignments)), "README.md")
        checked += 1
    assert checked >= 5


def _alternatives() -> Iterator[tuple[str, int, str, str, str]]:
    """(block, source index, table, key, value) for every value a README TOML comment
    offers: `keep = "best_license"  # or "highest_resolution" | "earliest"` and
    `# resize_mode = "keep_ratio" | "border" | ...`."""
    for block in _toml_blocks():
        table, n_sources = "", 0
        for raw in block.splitlines():
            line = raw.strip()
            header = re.match(r"^\[\[?([a-z_.]+)\]\]?", line)
            if header:
                table = header.group(1)
                n_sources += line.startswith("[[sources]]")
                continue
            m = re.match(r"^#?\s*([a-z_]+)\s*=\s*[^#]*#\s*(.*)$", line)
            if not m:
                continue
            key, comment = m.groups()
            other = re.match(r"^([a-z_]+)\s*=\s*(\"[^\"]*\"(?:\s*\|\s*\"[^\"]*\")+)", comment)
            if other:  # the comment documents another key's values
                key, offered = other.group(1), other.group(2)
            elif comment.startswith("or "):
                offered = re.split(r"[;:(]", comment[3:], maxsplit=1)[0]
            else:
                continue
            for value in re.findall(r'"([^"]*)"', offered):
                yield block, n_sources - 1, table, key, value


def test_readme_documented_alternatives_load() -> None:
    seen = 0
    for block, index, table, key, value in _alternatives():
        parse_config(_with(block, index, table, {key: value}), "README.md")
        seen += 1
    assert seen >= 8  # resize modes, licence policy, dedup keep policies, train preset


def test_readme_dedup_defaults_are_the_code_defaults() -> None:
    """The README's `[dedup]` comment lists the defaults and what `verify = "none"` brings."""
    from ccurate.filters.config import DedupConfig

    lines = [
        s for _, _, t, s, d in _commented_settings() if t == "dedup" and d and "\n" in s
    ]  # fmt: skip
    assert lines, "README's [dedup] block no longer lists its defaults"
    plain = DedupConfig()
    for assignments in lines:
        values = tomllib.loads(assignments)
        if values.get("verify") == "none":
            got = DedupConfig.model_validate({"verify": "none"})
        else:
            got = plain
        for key, want in values.items():
            assert getattr(got, key) == want, (key, want, getattr(got, key))


# ------------------------------------------------------------------ documented defaults


def _md_table(doc: Path, heading: str) -> list[list[str]]:
    text = doc.read_text(encoding="utf-8")
    part = text.split(heading, 1)[1]
    rows = []
    for ln in part.splitlines()[1:]:
        if ln.startswith("#"):
            break
        if ln.startswith("|") and not re.match(r"^\|[-| ]+\|$", ln):
            rows.append([c.strip() for c in ln.strip("|").split("|")])
    return rows[1:]  # without the header


def _doc_value(cell: str) -> Any:
    cell = cell.strip("`")
    if cell == "unset":
        return None
    try:
        return json.loads(cell)
    except ValueError:
        return cell


def test_rebuild_table_lists_every_key_with_its_default() -> None:
    from ccurate.rebuild import RebuildConfig

    rows = _md_table(ROOT / "docs" / "rebuilds.md", "## Configuration: `[rebuild]`")
    documented = {r[0].strip("`"): _doc_value(r[1]) for r in rows}
    assert set(documented) == set(RebuildConfig.model_fields)
    code = RebuildConfig()
    for key, want in documented.items():
        assert getattr(code, key) == want, (key, want, getattr(code, key))
    # "unset: X" describes leaving the key out, i.e. the default: it must be the unset one
    for key, _, meaning in rows:
        if "unset:" in meaning:
            assert documented[key.strip("`")] is None, f"{key}: 'unset' is not its default"


def test_exit_codes_table_matches_the_cli() -> None:
    rows = _md_table(ROOT / "docs" / "rebuilds.md", "### Exit codes")
    codes = {int(r[0]): r[1] for r in rows}
    assert set(codes) == {0, EXIT_ERROR, EXIT_CONFIG, EXIT_NOT_READY, EXIT_LOCKED}
    assert "unexpected" in codes[EXIT_ERROR]
    assert "config" in codes[EXIT_CONFIG]
    assert "cannot run" in codes[EXIT_NOT_READY]
    assert "rebuild" in codes[EXIT_LOCKED] and "lock" in codes[EXIT_LOCKED]


def test_takedown_and_lookup_radius_defaults() -> None:
    """rebuilds.md: `--phash (--radius)` defaults to `takedown_radius` (8), the same
    radius `ccurate lookup` uses by default."""
    from ccurate.rebuild import RebuildConfig

    lookup = _root().commands["lookup"]
    radius = next(p for p in lookup.params if "--radius" in p.opts)
    assert radius.default == RebuildConfig().takedown_radius == 8


def test_demo_paths_are_the_demo_config() -> None:
    """README: `make demo` -> `ccurate demo --out demo-out`; the release is
    `demo-out/releases/demo-v1`, the report `demo-out/work/report.html` and the
    checkpoint and sample under `demo-out/work/train/`."""
    from ccurate.demo.run import demo_config

    demo = _root().commands["demo"]
    out_opt = next(p for p in demo.params if "--out" in p.opts)
    assert Path(str(out_opt.default)) == Path("demo-out")
    out = Path("/x/demo-out")
    corpus: Any = SimpleNamespace(pages=["/p.html"])
    cfg = demo_config(corpus, "http://127.0.0.1:1", out, 2, None, 20)
    assert Path(cfg.run.release_dir) / str(cfg.run.release_name) == out / "releases/demo-v1"
    assert cfg.run.train_out == out / "work" / "train"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "demo-out/releases/demo-v1" in readme and "demo-out/work/report.html" in readme


def test_step_folders_named_in_the_docs_exist() -> None:
    from ccurate import rebuild
    from ccurate.pipeline import STEP_DIRS

    known = set(STEP_DIRS.values()) | {rebuild.RECHECK, rebuild.RELEASE_INPUT, "00_sources"}
    named = set()
    for _, span in _snippets():
        named.update(re.findall(r"(?:^|/)(\d\d_[a-z_]+)/", span))
    assert named and named <= known, named - known


# ------------------------------------------------------------------ files and benchmarks


def test_repository_paths_named_in_the_docs_exist() -> None:
    problems = []
    for where, span in _snippets():
        if where.endswith((".service", "Makefile")):
            continue
        for word in span.split():
            word = word.strip("(),;:`'\"")
            parts = word.split("/")
            if (
                len(parts) < 2
                or parts[0] not in REPO_DIRS
                or re.search(r"[<>{}*$]", word)
                or any(p.startswith(".") for p in parts)
            ):
                continue
            if not (ROOT / word).exists():
                problems.append(f"{where}: {word}")
    assert not problems, "\n".join(problems)


def _bench_options(script: str) -> set[str]:
    source = (ROOT / "bench" / script).read_text(encoding="utf-8")
    return set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", source)) | {"--help"}


def test_benchmark_options_named_in_the_docs_exist() -> None:
    """A bench script's options in a command line, or in its row of a table."""
    problems = []
    checked = 0
    scripts = {p.name for p in (ROOT / "bench").glob("*.py")}
    units: list[tuple[str, str]] = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        lines, rest = _fenced_and_indented(text)
        units += [(doc.name, ln) for ln in lines]
        units += [(doc.name, ln) for ln in rest.splitlines() if ln.startswith("|")]
    for where, unit in units:
        named = [s for s in re.findall(r"([a-z_0-9]+\.py)\b", unit) if s in scripts]
        if not named:
            continue
        opts = _bench_options(named[0])
        for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", unit):
            checked += 1
            if opt not in opts:
                problems.append(f"{where}: {named[0]} has no {opt}")
    assert checked > 10
    assert not problems, "\n".join(problems)


def test_bench_scripts_named_in_the_docs_exist() -> None:
    scripts = {p.name for p in (ROOT / "bench").glob("*.py")}
    named = set()
    for _, span in _snippets():
        named.update(re.findall(r"(?:bench/)?\b([a-z_0-9]+\.py)\b", span))
    bench_like = {n for n in named if re.search(r"_(eval|throughput|read|scaling|vs_)", n)}
    assert bench_like and bench_like <= scripts, bench_like - scripts


@pytest.mark.parametrize("doc", [d.name for d in DOCS])
def test_docs_have_code(doc: str) -> None:
    """The extractors see every doc (guards against a doc moving out of their sight)."""
    path = next(d for d in DOCS if d.name == doc)
    assert _spans(path.read_text(encoding="utf-8"))

"""The corpus stage end to end, its sources, and its errors through the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import CorpusCfg, SourceCfg, load_config
from lmforge.data.sources import glob_regex, list_files, read_sources
from lmforge.errors import UserError
from lmforge.stages import run_stage
from lmforge.stages.corpus import in_val

REPO = Path(__file__).resolve().parents[2]
RNG_WORDS = np.random.default_rng(7)
VOCAB = ["".join(RNG_WORDS.choice(list("abcdefghijklmnop"), size=6)) for _ in range(3000)]


def words(seed: int, n: int = 120) -> list[str]:
    rng = np.random.default_rng(seed)
    return [VOCAB[i] for i in rng.integers(len(VOCAB), size=n)]


def text(seed: int, n: int = 120) -> str:
    return " ".join(words(seed, n))


def make_tree(root: Path) -> Path:
    """A tree whose every count is known by hand (see test_counts_by_hand)."""
    b = words(2)
    near_b = list(b)
    near_b[60] = "changedword"  # one of 120 words: 5-shingle Jaccard ~ 0.92
    files = {
        "a.txt": text(1),
        "b.md": " ".join(b),
        "c.py": "def f(x):\n    return x\n# " + text(3),
        "near_b.md": " ".join(near_b),
        "short.txt": "too short",
        "sub/d.txt": text(4),
        "sub/dup_a.txt": "  " + text(1).replace(" ", "\n") + "\n",  # a.txt, re-wrapped
        "ignored.csv": text(5),  # extension not listed
        ".hidden/e.txt": text(6),  # hidden directories are never read
    }
    for rel, body in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(body, encoding="utf-8")
    rows = [{"text": text(10), "id": 1}, None, {"text": text(11)}, {"text": "y" * 5000}]
    (root / "data.jsonl").write_text(
        "\n".join("" if r is None else json.dumps(r) for r in rows) + "\n", encoding="utf-8"
    )
    (root / "latin1.txt").write_bytes(("caf\xe9 " + text(12)).encode("latin-1"))
    return root


def cfg_for(src: Path, out: Path, **kw: object) -> CorpusCfg:
    base = {"min_chars": 100, "max_chars": 4000, "val_fraction": 0.5, "seed": 0}
    return CorpusCfg(run={"dir": out}, sources=[SourceCfg(path=src)], **{**base, **kw})


def load_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_split(d: Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    return load_jsonl(d / "train.jsonl"), load_jsonl(d / "val.jsonl")


def test_counts_by_hand(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    summary = run_stage("corpus", cfg_for(src, tmp_path / "out"))
    # files: a b c data.jsonl latin1 near_b short sub/d sub/dup_a (not .csv, not .hidden/)
    assert summary["files_seen"] == 9
    assert summary["documents_read"] == 10  # 7 plain files + 3 jsonl lines (blank line skipped)
    assert summary["undecodable_skipped"] == 1
    assert summary["undecodable_files"] == [str(src / "latin1.txt")]
    assert summary["too_short"] == 1  # short.txt
    assert summary["too_long"] == 1  # the 5000-char jsonl line
    assert summary["exact_duplicates"] == 1  # sub/dup_a.txt (a.txt re-wrapped)
    assert summary["near_duplicates"] == 1  # near_b.md
    assert summary["train_docs"] + summary["val_docs"] == 6
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary

    train, val = read_split(tmp_path / "out")
    assert train and val
    sources = sorted(r["source"] for r in train + val)
    expected = ["a.txt", "b.md", "c.py", "data.jsonl:1", "data.jsonl:3", "sub/d.txt"]
    assert sources == sorted(str(src / e) for e in expected)
    assert summary["train_bytes"] == sum(len(r["text"].encode()) for r in train)
    assert summary["val_bytes"] == sum(len(r["text"].encode()) for r in val)
    assert all(in_val(r["text"], 0, 0.5) for r in val)
    assert not any(in_val(r["text"], 0, 0.5) for r in train)


def test_split_is_deterministic_disjoint_and_stable_under_additions(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    run_stage("corpus", cfg_for(src, tmp_path / "one"))
    run_stage("corpus", cfg_for(src, tmp_path / "two"))
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    train, val = read_split(tmp_path / "one")
    assert not {r["text"] for r in train} & {r["text"] for r in val}

    for i in range(20):
        (src / f"more_{i:02d}.txt").write_text(text(100 + i), encoding="utf-8")
    run_stage("corpus", cfg_for(src, tmp_path / "three"))
    train3, val3 = read_split(tmp_path / "three")
    assert {r["text"] for r in train} <= {r["text"] for r in train3}
    assert {r["text"] for r in val} <= {r["text"] for r in val3}
    assert len(train3) + len(val3) == len(train) + len(val) + 20


def test_split_depends_on_seed(tmp_path: Path) -> None:
    texts = [text(i) for i in range(200)]
    val0 = {t for t in texts if in_val(t, 0, 0.3)}
    val1 = {t for t in texts if in_val(t, 1, 0.3)}
    assert val0 != val1
    assert 30 < len(val0) < 90  # ~60 expected


def test_everything_filtered_is_a_user_error(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    with pytest.raises(UserError, match="no document survives"):
        run_stage("corpus", cfg_for(src, tmp_path / "out", min_chars=10_000, max_chars=20_000))
    assert not (tmp_path / "out" / "summary.json").exists()


def test_empty_val_is_a_user_error(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    with pytest.raises(UserError, match="val empty"):
        run_stage("corpus", cfg_for(src, tmp_path / "out", val_fraction=1e-9))


def test_near_dedup_can_be_turned_off(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    summary = run_stage("corpus", cfg_for(src, tmp_path / "out", near_dedup=False))
    assert summary["near_duplicates"] == 0 and summary["lsh"] is None
    assert summary["train_docs"] + summary["val_docs"] == 7


# --------------------------------------------------------------------------- sources


def test_glob_semantics() -> None:
    rx = glob_regex("**/*.py")
    assert rx.match("top.py") and rx.match("a/b/c.py") and not rx.match("a/b.pyc")
    one = glob_regex("*.py")
    assert one.match("top.py") and not one.match("a/top.py")
    assert glob_regex("docs/**").match("docs/x/y.md") and not glob_regex("docs/**").match("src/x.md")
    assert glob_regex("f[!0-9]?.txt").match("fa1.txt") and not glob_regex("f[!0-9]?.txt").match("f11.txt")


def test_exclude_dirs_are_name_patterns_below_the_source(tmp_path: Path) -> None:
    for rel in ("keep/a.py", "tests/b.py", "pkg/x_test/c.py", "pkg/test_y/d.py", "pkg/e.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("pass\n")
    src = SourceCfg(path=tmp_path, exclude_dirs=["tests", "*_test", "test_*"])
    got = [p.relative_to(tmp_path).as_posix() for p in list_files(src, [".py"])]
    assert got == ["keep/a.py", "pkg/e.py"]
    # The source path itself is never excluded, only directories below it.
    inside = SourceCfg(path=tmp_path / "tests", exclude_dirs=["tests"])
    assert [p.name for p in list_files(inside, ["py"])] == ["b.py"]


def test_extensions_are_case_insensitive_and_named_files_are_always_read(tmp_path: Path) -> None:
    (tmp_path / "A.TXT").write_text("upper", encoding="utf-8")
    (tmp_path / "notes.rst").write_text("named directly", encoding="utf-8-sig")  # adds a BOM
    assert [p.name for p in list_files(SourceCfg(path=tmp_path), ["txt"])] == ["A.TXT"]
    read = read_sources([SourceCfg(path=tmp_path / "notes.rst")], [".txt"])
    assert [d.text for d in read.documents] == ["named directly"]  # BOM stripped


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "ok"', "invalid JSON"),
        ('["a list"]', "expected a JSON object with a 'body' field, got list"),
        ('{"text": "wrong field"}', "missing text field 'body'"),
        ('{"body": 3}', "text field 'body' must be a string, got int"),
    ],
)
def test_bad_jsonl_names_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "fine"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        read_sources([SourceCfg(path=path, text_field="body")], [".jsonl"])
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)


def test_configs_validate_and_tiny_runs(tmp_path: Path) -> None:
    for yaml_path in sorted((REPO / "configs" / "corpus").glob("*.yaml")):
        load_config(CorpusCfg, yaml_path)
    cfg = load_config(CorpusCfg, REPO / "configs" / "corpus" / "tiny.yaml", [f"run.dir={tmp_path}"])
    summary = run_stage("corpus", cfg)  # the embedded default: this interpreter's stdlib
    assert summary["train_docs"] > 100 and summary["val_docs"] > 5
    assert summary["undecodable_skipped"] == 0
    assert all("site-packages" not in r["source"] for r in sum(read_split(tmp_path), []))


# --------------------------------------------------------------------------- the CLI contract


def cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "corpus", *overrides],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
    )


def sources_override(path: Path) -> str:
    return "sources=" + json.dumps([{"path": str(path)}])  # JSON is YAML, and quotes any path


def assert_user_error(proc: subprocess.CompletedProcess[str], out: Path, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0]
    assert not (out / "summary.json").exists()


def test_cli_empty_directory_exits_2_naming_it(tmp_path: Path) -> None:
    empty, out = tmp_path / "empty corpus", tmp_path / "out"
    empty.mkdir()
    proc = cli(tmp_path, sources_override(empty), f"run.dir={out}")
    assert_user_error(proc, out, str(empty), "no files match")


def test_cli_bad_jsonl_line_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    data, out = tmp_path / "data.jsonl", tmp_path / "out"
    data.write_text('{"text": "' + "fine " * 50 + '"}\n{"text": oops}\n', encoding="utf-8")
    proc = cli(tmp_path, sources_override(data), f"run.dir={out}")
    assert_user_error(proc, out, f"{data}:2", "invalid JSON")


def test_cli_missing_source_exits_2(tmp_path: Path) -> None:
    missing, out = tmp_path / "nope", tmp_path / "out"
    proc = cli(tmp_path, sources_override(missing), f"run.dir={out}")
    assert_user_error(proc, out, str(missing), "does not exist")


def test_cli_success_with_an_undecodable_file(tmp_path: Path) -> None:
    src, out = make_tree(tmp_path / "src"), tmp_path / "out"
    shutil.rmtree(src / "sub")
    proc = cli(tmp_path, sources_override(src), f"run.dir={out}", "min_chars=100",
               "max_chars=4000", "val_fraction=0.5")
    assert proc.returncode == 0, proc.stderr
    assert "1 undecodable skipped" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["undecodable_skipped"] == 1 and summary["files_seen"] == 7


def test_cli_all_undecodable_names_the_count_and_a_file(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i in range(3):  # binary blobs named like text: nothing here is UTF-8
        (src / f"blob{i}.txt").write_bytes(bytes([0xFF, 0xFE, 0x80 + i]) * 200)
    proc = cli(tmp_path, sources_override(src), f"run.dir={out}")
    assert_user_error(proc, out, "no documents read from 3 files",
                      "3 of 3 files undecodable (not UTF-8)", f"e.g. {src / 'blob0.txt'}")
    assert "size filter" not in proc.stderr
    assert not (out / "train.jsonl").exists()


def test_undecodable_files_are_named_when_the_size_filter_empties_the_corpus(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("short", encoding="utf-8")
    (src / "b.txt").write_bytes(b"\xff" * 500)
    with pytest.raises(UserError, match=r"no document survives the size filters .*; 1 of 2 "
                                        r"files undecodable \(not UTF-8\), e\.g\. .*b\.txt"):
        run_stage("corpus", cfg_for(src, tmp_path / "out"))


# --------------------------------------------------------------------------- decontamination


def eval_files(root: Path) -> tuple[Path, Path]:
    """Items cut from make_tree's documents, each with a known fate (see the next test)."""
    root.mkdir(parents=True, exist_ok=True)
    one = root / "one.jsonl"
    one.write_text("\n".join(json.dumps(r) for r in [
        {"id": "A", "question": " ".join(words(1)[30:50]).upper()},  # 20 words of a.txt
        # 12 words of sub/d.txt, then 8 others: no 13-word span in common
        {"id": "B", "question": " ".join(words(4)[:12] + words(99)[:8])},
        {"id": "C", "question": " ".join(words(3)[:7])},  # 7 words of c.py: too short to check
    ]) + "\n", encoding="utf-8")
    two = root / "two.json"
    two.write_text(json.dumps([
        {"task_id": "D", "prompt": " ".join(words(11)[5:18])},  # 13 words of data.jsonl:3
        {"task_id": "E", "prompt": ", ".join(words(1)[100:120])},  # a.txt again
    ]), encoding="utf-8")
    return one, two


def test_decontamination_drops_exactly_the_contaminated_docs(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    one, two = eval_files(tmp_path / "eval")
    plain = run_stage("corpus", cfg_for(src, tmp_path / "plain"))
    assert plain["decontamination"] is None and not (tmp_path / "plain" / "decontamination.jsonl").exists()
    summary = run_stage("corpus", cfg_for(src, tmp_path / "out", decontaminate={"against": [one, two]}))

    dropped = {str(src / "a.txt"), str(src / "data.jsonl:3")}  # sub/dup_a.txt went in exact dedup
    before_train, before_val = read_split(tmp_path / "plain")
    train, val = read_split(tmp_path / "out")
    # The split is by document hash, so each survivor stays where it was.
    assert train == [r for r in before_train if r["source"] not in dropped]
    assert val == [r for r in before_val if r["source"] not in dropped]
    assert len(train) + len(val) == len(before_train) + len(before_val) - 2

    dec = summary["decontamination"]
    assert dec["dropped_docs"] == 2
    assert dec["dropped_by_set"] == {str(one): 1, str(two): 2}
    assert dec["sets"][str(one)] == {"items": 3, "checked": 2, "too_short": 1, "contaminated_items": 1}
    assert dec["sets"][str(two)] == {"items": 2, "checked": 2, "too_short": 0, "contaminated_items": 2}
    rows = load_jsonl(tmp_path / "out" / "decontamination.jsonl")
    assert sorted(rows, key=lambda r: r["doc"]) == [
        {"doc": str(src / "a.txt"), "items": {str(one): ["A"], str(two): ["E"]}},
        {"doc": str(src / "data.jsonl:3"), "items": {str(two): ["D"]}},
    ]


def test_decontamination_config_keys(tmp_path: Path) -> None:
    cfg = load_config(CorpusCfg, None, ["decontaminate.against=[x.jsonl]", "decontaminate.n=8"])
    assert cfg.decontaminate.against == [Path("x.jsonl")] and cfg.decontaminate.n == 8
    assert CorpusCfg().decontaminate.against == [] and CorpusCfg().decontaminate.n == 13
    with pytest.raises(UserError, match="decontaminate.n"):
        load_config(CorpusCfg, None, ["decontaminate.n=0"])


def test_cli_missing_eval_file_exits_2_naming_the_key(tmp_path: Path) -> None:
    src, out = make_tree(tmp_path / "src"), tmp_path / "out"
    one, _ = eval_files(tmp_path / "eval")
    missing = tmp_path / "eval" / "gone.jsonl"
    against = "decontaminate.against=" + json.dumps([str(one), str(missing)])
    proc = cli(tmp_path, sources_override(src), f"run.dir={out}", against)
    assert_user_error(proc, out, "decontaminate.against.1", str(missing), "not found")

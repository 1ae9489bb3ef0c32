"""`lmforge ui` over HTTP (FastAPI's test client): what each page shows, the curves API,
bad input (a half-written run, a malformed metrics line, paths out of the root), the token,
the annotation flow and its results, and that the runs directory is never written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lmforge.annotate import LABELS, PREFERENCES, load_session  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.ui.app import create_app, thin  # noqa: E402
from lmforge.ui.html import fmt, markdown  # noqa: E402
from tests.ui.conftest import SFT_LOSS  # noqa: E402

LOCAL = "http://127.0.0.1"


def client(runs: Path, labels: Path | None = None, **kw) -> TestClient:
    return TestClient(create_app(runs, labels, **kw), base_url=LOCAL)


def test_runs_page_shows_each_stage_state_and_what_could_not_be_read(runs: Path) -> None:
    page = client(runs).get("/").text
    assert 'href="/stage/demo/sft"' in page and 'href="/report/demo"' in page
    for name, state in (("sft", "finished"), ("dpo", "finished"), ("grpo", "failed")):
        row = page.split(f'data-stage="demo/{name}"')[1][:120]
        assert f'data-state="{state}"' in row
    assert "summary.json: " in page  # grpo's half-written summary, said in its row


def test_curves_skip_and_name_a_malformed_line(runs: Path) -> None:
    r = client(runs).get("/api/curves", params={"s": ["demo/sft", "demo/dpo"], "m": ["loss"]})
    got = r.json()
    sft = got["stages"]["demo/sft"]
    assert sft["metrics"] == {"loss": [[s for s, _ in SFT_LOSS], [v for _, v in SFT_LOSS]]}
    assert sft["problems"] == ["metrics.jsonl:3: not a JSON line, skipped"]
    assert got["stages"]["demo/dpo"]["metrics"]["loss"][0] == [1, 2, 3]
    assert got["names"] == ["loss", "rewards/margin", "val_loss"]


def test_a_metrics_file_that_grew_is_read_again(runs: Path) -> None:
    c = client(runs)
    ask = {"s": ["demo/dpo"], "m": ["loss"]}
    assert c.get("/api/curves", params=ask).json()["stages"]["demo/dpo"]["metrics"]["loss"][0] == [1, 2, 3]
    with open(runs / "demo" / "dpo" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.25}\n')
    got = c.get("/api/curves", params=ask).json()["stages"]["demo/dpo"]["metrics"]["loss"]
    assert got == [[1, 2, 3, 4], [0.7 - 0.1 * s for s in (1, 2, 3)] + [0.25]]  # as written


def test_a_long_series_is_thinned_by_stride_keeping_the_last_point() -> None:
    pts = [(s, float(s)) for s in range(10)]
    assert thin(pts, limit=4) == [[0, 3, 6, 9], [0.0, 3.0, 6.0, 9.0]]  # k = ceil(10/4) = 3
    assert thin(pts[:9], limit=4)[0] == [0, 3, 6, 8]  # 8 is not on the stride: appended
    assert thin(pts, limit=10) == [list(range(10)), [float(s) for s in range(10)]]


def test_stage_page_has_charts_eval_tables_samples_and_config(runs: Path) -> None:
    c = client(runs)
    page = c.get("/stage/demo/sft").text
    assert 'data-metrics="[&quot;loss&quot;, &quot;val_loss&quot;]"' in page
    assert "<td>d1</td><td>0</td><td>0.91</td>" in page  # pass@1 before and after
    assert "eval_after.jsonl" in page and "return 1" in page  # a sample
    assert "lr: 0.003" in page  # the resolved config
    ev = c.get("/stage/demo/eval").text
    assert "synthetic-code" in ev and "pass@5 0.67" in ev and "synthetic-code / d1" in ev


def test_compare_diffs_two_configs_key_by_key(runs: Path) -> None:
    page = client(runs).get("/compare", params={"s": ["demo/sft", "demo/dpo"]}).text
    assert "<td>optim.lr</td><td>0.003</td><td>1.000e-05</td>" in page
    assert "run.dir</td>" not in page  # always different, never news
    assert "train.max_steps" not in page.split("unified diff")[0]  # equal: not listed


def test_the_report_renders_with_images_from_inside_the_run_only(runs: Path) -> None:
    page = client(runs).get("/report/demo").text
    assert '<img alt="loss curves" src="/file/demo/loss.png">' in page
    assert "passwd" not in page.split("secret")[1][:40] and "<img alt=\"secret\"" not in page
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<td><b>2.0</b></td>" in page


@pytest.mark.parametrize("path", [
    "/stage/../../etc/passwd", "/stage/%2e%2e/%2e%2e/etc/passwd", "/file/../../etc/passwd",
    "/file/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/report/..%2f..%2fetc", "/static/../app.py",
    "/stage/demo/sft/checkpoints", "/annotate/..%2f..%2fetc/results", "/file/demo/sft"])
def test_paths_out_of_the_root_are_404_and_the_app_stays_up(runs: Path, labels: Path,
                                                             path: str) -> None:
    c = client(runs, labels)
    r = c.get(path)
    assert r.status_code == 404 and "root:" not in r.text
    assert c.get("/").status_code == 200


def test_browsing_every_page_writes_nothing_under_runs(runs: Path, labels: Path) -> None:
    def snapshot() -> dict[str, tuple[int, int]]:
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in runs.rglob("*")}

    before = snapshot()
    c = client(runs, labels)
    for url in ("/", "/stage/demo/sft", "/stage/demo/grpo", "/stage/demo/eval", "/report/demo",
                "/compare?s=demo/sft&s=demo/dpo", "/api/stages", "/api/curves?s=demo/sft",
                "/file/demo/loss.png", "/annotate", "/annotate/s1/results"):
        assert c.get(url).status_code == 200, url
    assert snapshot() == before


def test_a_token_is_checked_on_every_request(runs: Path) -> None:
    c = client(runs, token="s3cret", loopback=False)
    for url in ("/", "/api/curves?s=demo/sft", "/static/charts.js", "/file/demo/loss.png"):
        assert c.get(url).status_code == 401, url
    assert c.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/stages", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    first = c.get("/?token=s3cret")  # the browser's way in: a cookie for the pages after
    assert first.status_code == 200 and "httponly" in first.headers["set-cookie"].lower()
    assert c.get("/stage/demo/sft").status_code == 200  # the cookie, no token in the URL


def test_loopback_refuses_another_host_name_and_a_form_from_another_site(runs: Path,
                                                                        labels: Path) -> None:
    c = client(runs, labels)
    assert c.get("/", headers={"Host": "attacker.example"}).status_code == 400
    r = c.post("/annotate/s1/label", headers={"Origin": "http://attacker.example"},
               data={"annotator": "x"})
    assert r.status_code == 403 and not (labels / "s1" / LABELS).exists()
    assert "default-src 'self'" in c.get("/").headers["content-security-policy"]


def _label(c: TestClient, who: str, choices: list[str], reason: str = "") -> None:
    for choice in choices:
        page = c.get("/annotate/s1", params={"annotator": who}).text
        fields = {k: page.split(f'name="{k}" value="')[1].split('"')[0]
                  for k in ("item", "left", "right")}
        r = c.post("/annotate/s1/label", data={"annotator": who, "choice": choice,
                                               "reason": reason, **fields},
                   follow_redirects=False)
        assert r.status_code == 303


def test_labels_over_http_resume_and_a_form_sent_twice_counts_once(runs: Path,
                                                                   labels: Path) -> None:
    c = client(runs, labels)
    _label(c, "ann", ["left", "right", "left", "tie", "skip"])
    page = c.get("/annotate/s1", params={"annotator": "ann"}).text
    assert 'data-index="5"' in page and "<b>6</b> of 12" in page
    again = client(runs, labels)  # a restarted server reads the same record
    assert 'data-index="5"' in again.get("/annotate/s1?annotator=ann").text
    rows = [json.loads(x) for x in (labels / "s1" / LABELS).read_text().splitlines()]
    last = {k: rows[-1][k] for k in ("item", "left", "right")}
    c.post("/annotate/s1/label", data={"annotator": "ann", "choice": "left", **last})
    assert len((labels / "s1" / LABELS).read_text().splitlines()) == 5
    prefs = [json.loads(x) for x in (labels / "s1" / PREFERENCES).read_text().splitlines()]
    assert [p["chosen_position"] for p in prefs] == ["left", "right", "left"]
    assert c.get("/annotate/s1/files/preferences.jsonl").text == \
        (labels / "s1" / PREFERENCES).read_text()
    assert c.get("/annotate/s1/files/session.json").status_code == 404
    wrong = c.post("/annotate/s1/label", data={"annotator": "ann", "choice": "left",
                                               "item": "q0", "left": "nobody", "right": "sft"})
    assert wrong.status_code == 400 and "not in ann&#x27;s comparisons" in wrong.text


def test_thumbs_mode_writes_the_kto_file(runs: Path, tmp_path: Path) -> None:
    from lmforge.data.preference import load_unpaired
    from tests.ui.conftest import make_session

    make_session(tmp_path / "labels", "t1", mode="thumbs")
    c = client(runs, tmp_path / "labels")
    page = c.get("/annotate/t1", params={"annotator": "ann"}).text
    assert "answer <b>1</b> of 12" in page and 'value="up"' in page and 'value="left"' not in page
    for choice in ("up", "down", "skip", "up"):
        page = c.get("/annotate/t1", params={"annotator": "ann"}).text
        fields = {k: page.split(f'name="{k}" value="')[1].split('"')[0] for k in ("item", "left")}
        c.post("/annotate/t1/label", data={"annotator": "ann", "choice": choice, "right": "",
                                           **fields})
    rows, _ = load_unpaired(str(tmp_path / "labels" / "t1" / "kto.jsonl"))
    assert [u.desirable for u in rows] == [True, False, True]
    kto = [json.loads(x) for x in (tmp_path / "labels" / "t1" / "kto.jsonl").read_text().splitlines()]
    table = c.get("/annotate/t1/results").text.split("thumbs up")[1]
    for m in {r["model"] for r in kto}:
        mine = [r["label"] for r in kto if r["model"] == m]
        assert f"<td>{m}</td><td>{fmt(sum(mine) / len(mine))}</td><td>{len(mine)}</td>" in table


def test_names_and_reasons_are_escaped_in_every_page(runs: Path, labels: Path) -> None:
    c = client(runs, labels)
    evil = '<img src=x onerror="alert(1)">'
    _label(c, evil, ["left"], reason="<script>steal()</script>")
    for url in ("/annotate", "/annotate/s1/results", f"/annotate/s1?annotator={evil}"):
        page = c.get(url).text
        assert "<img src=x" not in page and "<script>steal" not in page, url
        assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page, url


def test_results_show_kappa_win_rates_left_bias_next_to_the_judge_and_elo(
        runs: Path, labels: Path) -> None:
    """Two annotators, the same 12 comparisons (4 items x 3 model pairs), each on their own
    sides. ann's verdicts go round: base beats dpo, sft beats base, dpo beats sft (base 4,
    sft 4, dpo 4). bob agrees except dpo-sft, where sft wins (base 4, sft 8). By hand:
    p_o = 8/12, p_e = (4/12)(4/12) + (4/12)(8/12) + (4/12)(0) = 1/3,
    kappa = (2/3 - 1/3) / (1 - 1/3) = 0.5. Wins over both: sft 12 of 16, base 8, dpo 4."""
    c = client(runs, labels)
    s = load_session(labels / "s1")
    beats = {("base", "dpo"): "base", ("base", "sft"): "sft", ("dpo", "sft"): "dpo"}
    lefts = 0
    for who in ("ann", "bob"):
        for sh in s.order(who):
            pair = tuple(sorted((sh.left, sh.right)))
            want = "sft" if who == "bob" and pair == ("dpo", "sft") else beats[pair]
            choice = "left" if sh.left == want else "right"
            lefts += choice == "left"
            c.post("/annotate/s1/label", data={"annotator": who, "choice": choice,
                                               "item": sh.item, "left": sh.left, "right": sh.right})
    page = c.get("/annotate/s1/results").text
    assert "data-kappa='0.500000'>Cohen's kappa <b>0.500</b> (moderate)" in page
    rates = page.split("win rates")[1].split("</table>")[0]
    assert rates.index("<td>sft</td><td>0.75</td><td>16</td>") < rates.index("<td>base</td><td>0.5</td>")
    assert "<td>dpo</td><td>0.25</td><td>16</td><td>0.102 - 0.495</td>" in rates  # Wilson 4/16
    assert f"<td>{lefts / 24:.3f}</td><td>24</td>" in page  # the humans' left-bias
    assert "LLM judge (demo/eval)" in page and "<td>0.65</td>" in page
    elo = page.split("Bradley-Terry / Elo")[1]
    assert elo.index("<td>sft</td>") < elo.index("<td>base</td>") < elo.index("<td>dpo</td>")


def test_markdown_escapes_before_it_marks_up() -> None:
    html = markdown("# T\n\n| a | b |\n|---|---|\n| `x<y` | [l](javascript:alert(1)) |\n",
                    lambda s: None)
    assert "<h2>T</h2>" in html and "<code>x&lt;y</code>" in html
    assert 'href="javascript' not in html


def test_ui_refuses_an_open_host_without_a_token_in_one_line(runs: Path, capsys) -> None:
    assert main(["ui", "--runs", str(runs), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--token" in err
    assert main(["ui", "--runs", str(runs / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_a_broken_session_is_shown_as_such(runs: Path, labels: Path) -> None:
    broken = labels / "broken"
    broken.mkdir()
    (broken / "session.json").write_text('{"mode": "pairs", "seed": 0}')  # no items.jsonl
    c = client(runs, labels)
    listing = c.get("/annotate").text
    assert 'class="warn"' in listing.split("broken")[1][:200] and "items.jsonl" in listing
    assert c.get("/annotate/broken?annotator=x").status_code == 400
    assert c.get("/annotate/s1?annotator=x").status_code == 200


def test_a_damaged_label_record_is_named_and_the_other_pages_stay_up(runs: Path,
                                                                    labels: Path) -> None:
    c = client(runs, labels)
    _label(c, "ann", ["left", "right"])
    path = labels / "s1" / LABELS
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    r = c.get("/annotate/s1/results")
    assert r.status_code == 400 and "labels.jsonl:2: not a JSON line" in r.text
    assert "labels.jsonl:2" in c.get("/annotate").text and c.get("/").status_code == 200

"""The IPython extension: formatters for engine results, the %tracin magic, idempotent and cheap loading."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from tracin_engine.store.topk import Neighbors, TopK
from tracin_widgets import extension as ext



@pytest.fixture()
def ip():
    shell = InteractiveShell.instance()
    ext.load_ipython_extension(shell)
    yield shell
    ext.unload_ipython_extension(shell)


def _topk() -> TopK:
    pro = Neighbors(torch.tensor([[3, 1, 4], [0, 2, 5]]), torch.tensor([[0.9, 0.5, 0.25], [0.8, 0.4, 0.1]]))
    opp = Neighbors(torch.tensor([[7, 6, 8], [9, 6, 7]]), torch.tensor([[-0.7, -0.3, -0.125], [-0.6, -0.2, -0.05]]))
    return TopK(pro, opp)


def _images(n: int = 12):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10


def _html(ip, obj) -> str:
    data, _ = ip.display_formatter.format(obj)
    return data.get("text/html", "")


def test_topk_without_data_is_a_ranked_table(ip):
    ext.run_command("use off", ip.user_ns)
    out = _html(ip, _topk())
    assert "proponents" in out and "opponents" in out
    assert out.index(">#3<") < out.index(">#1<") < out.index(">#4<")    # best proponent first
    assert "+0.9" in out and "-0.7" in out and "<img" not in out
    assert "test example 1" in out                                         # both rows shown


def test_topk_with_data_is_a_gallery_with_one_thumbnail_per_neighbour(ip):
    X, y = _images()
    ip.user_ns["train_xy"] = (X, y)
    ip.run_line_magic("tracin", "use train_xy")
    out = _html(ip, _topk()[1])
    assert out.count("<img") == 6                                          # 3 proponents + 3 opponents
    assert "#9 · 9" in out                                                 # index and label of opponent 1
    ip.run_line_magic("tracin", "use off")
    assert "<img" not in _html(ip, _topk()[1])


def test_many_test_rows_are_truncated(ip):
    big = TopK(Neighbors(torch.zeros(9, 2, dtype=torch.long), torch.ones(9, 2)),
               Neighbors(torch.ones(9, 2, dtype=torch.long), -torch.ones(9, 2)))
    out = _html(ip, big)
    assert out.count("tracin-query") == ext.MAX_ROWS and "4 more test examples" in out


def test_loading_twice_is_harmless_and_unload_removes_the_formatters(ip):
    ext.load_ipython_extension(ip)
    ext.load_ipython_extension(ip)
    html_fmt = ip.display_formatter.formatters["text/html"]
    ours = [f for f in list(html_fmt.deferred_printers.values()) + list(html_fmt.type_printers.values())
            if f is ext._topk_html]
    assert len(ours) == 1
    assert "proponents" in _html(ip, _topk())
    ext.unload_ipython_extension(ip)
    assert _html(ip, _topk()) == ""
    ext.load_ipython_extension(ip)                                        # fixture teardown unloads again
    assert "proponents" in _html(ip, _topk())


def test_help_and_errors(ip, capsys):
    ip.run_line_magic("tracin", "help")
    assert "%tracin explore" in capsys.readouterr().out
    with pytest.raises(UsageError, match="unknown subcommand 'frobnicate'"):
        ip.run_line_magic("tracin", "frobnicate")
    with pytest.raises(UsageError, match="must be an index"):
        ip.run_line_magic("tracin", "info 42")
    with pytest.raises(UsageError, match="could not evaluate 'no_such_name'"):
        ip.run_line_magic("tracin", "info no_such_name")


def test_info_and_index_card(ip, cnn_index, capsys):
    ip.user_ns["index"] = cnn_index
    ip.run_line_magic("tracin", "info index")
    text = capsys.readouterr().out
    assert f"{cnn_index.n_train} training examples x {cnn_index.store.n_checkpoints} checkpoints" in text
    lr0 = f"{cnn_index.learning_rates[0].item():g}"
    assert lr0 in text and lr0 in _html(ip, cnn_index)
    ext.run_command("use off", ip.user_ns)
    with pytest.raises(UsageError, match="%tracin use"):
        ip.run_line_magic("tracin", "explore index")


def test_real_topk_from_an_index_renders_the_engine_ranking(ip, cnn_index, small_digits):
    ip.user_ns["split"] = small_digits
    ip.run_line_magic("tracin", "use split.train split.test")
    result = cnn_index.top_k(small_digits.test, k=4)
    out = _html(ip, result[0])
    first = int(result.proponents.indices[0, 0])
    assert f"#{first} · {int(small_digits.train[1][first])}" in out
    assert out.count("<img") == 8


def test_module_imports_neither_torch_nor_widgets():
    code = ("import sys\n"
            "import tracin_widgets.extension as mod\n"
            "bad = [m for m in ('torch', 'tracin_engine', 'ipywidgets', 'anywidget') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "assert callable(mod.load_ipython_extension)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_ext_imports_no_torch_until_a_gallery_is_used():
    code = ("import sys\n"
            "import tracin_widgets as tw\n"
            "from IPython.testing.globalipapp import get_ipython\n"
            "ip = get_ipython(); ip.run_line_magic('load_ext', 'tracin_widgets')\n"
            "assert 'torch' not in sys.modules, 'load_ext imported torch'\n"
            "tw.InfluenceExplorer\n"
            "assert 'torch' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_use_passes_render_options_so_token_ids_show_as_text(ip):
    ids = torch.tensor([[1, 2, 0], [2, 2, 1], [1, 0, 0]])
    vocab = ["<pad>", "hello", "world"]
    ip.user_ns.update(ids_data=(ids, torch.tensor([0, 1, 0])), vocab=vocab)
    ip.user_ns["decode"] = lambda x: " ".join(vocab[int(t)] for t in x if int(t) != 0)
    ip.run_line_magic("tracin", "use ids_data render=decode class_names=['greet','other']")
    nb = Neighbors(torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.25]]))
    out = _html(ip, nb)
    assert "world world hello" in out and "#1 · other" in out and "<img" not in out
    with pytest.raises(UsageError, match="unknown option"):
        ip.run_line_magic("tracin", "use ids_data colour=1")


def test_clusters_render_sizes_label_mix_and_representatives(ip, cnn_index, small_digits):
    clusters = cnn_index.cluster(4)
    ext.run_command("use off", ip.user_ns)
    plain = _html(ip, clusters)
    assert plain.count("<tr>") == 5 and "<img" not in plain          # header + 4 clusters
    assert f"<td>0</td><td>{int(clusters.sizes[0])}</td>" in plain
    ip.user_ns["split"] = small_digits
    ip.run_line_magic("tracin", "use split.train")
    out = _html(ip, clusters)
    counts = small_digits.train[1][clusters.labels == 0].bincount()
    top = int(counts.argmax())
    assert f"{top}: {int(counts[top]) / int(clusters.sizes[0]):.0%}" in out
    assert out.count("<img") == sum(min(4, len(r)) for r in clusters.representatives)


def _documented_forms() -> list[str]:
    """Every `%tracin ...` form in HELP, twice: without the optional [...] parts and with all of them."""
    import re

    forms = []
    for line in ext.HELP.splitlines():
        m = re.match(r"\s+%tracin (\S.*?)(?:\s{2,}|$)", line)
        if not m:
            continue
        usage = m.group(1)
        forms.append(re.sub(r"\s*\[[^\]]*\]", "", usage).strip())
        forms.append(re.sub(r"[\[\]]", "", usage).strip())
    return list(dict.fromkeys(forms))


def test_every_documented_form_of_the_magic_runs(ip, cnn_index, small_digits, capsys):
    import tracin_widgets as tw

    forms = _documented_forms()
    assert len(forms) >= 12 and any(f.startswith("outliers") and "page_size=48" in f for f in forms)
    ip.user_ns.update(index=cnn_index, split=small_digits, result=cnn_index.top_k(small_digits.test, k=3),
                      render_fn=lambda x: x, texts=[f"example {i}" for i in range(300)])
    values = {"INDEX": "index", "TRAIN": "split.train", "TEST": "split.test", "RESULT": "result", "ROW": "2",
              "f": "render_fn", "names": "split.class_names", "texts": "texts"}
    kinds = {"explore": tw.InfluenceExplorer, "outliers": tw.SelfInfluenceGallery, "clusters": tw.ClusterGallery}
    for form in forms:
        line = " ".join(values.get(w.split("=")[-1], w.split("=")[-1]) if "=" not in w else
                        f"{w.split('=')[0]}={values.get(w.split('=')[1], w.split('=')[1])}" for w in form.split())
        if not line.startswith("use") and "use" not in form:
            ext.run_command("use split.train split.test class_names=split.class_names", ip.user_ns)
        out = ip.run_line_magic("tracin", line)
        cmd = line.split()[0]
        if cmd in kinds:
            assert isinstance(out, kinds[cmd]) and out.last_error is None, line
            if "page_size=48" in line:
                assert out.page_size == 48
            if "k=8" in line:
                assert out.k == 8
            if "n=8" in line:
                assert len(out.clusters.sizes) == 8
        elif cmd == "show":
            row = int(line.split()[2]) if len(line.split()) > 2 else 0
            assert f"test #{row} " in out.data and out.data.count("<img") == 1 + 6
    capsys.readouterr()


def test_outliers_accepts_k_and_text_options_show_original_text(ip, cnn_index, small_digits):
    ip.user_ns.update(index=cnn_index, split=small_digits, texts=[f"sentence number {i}" for i in range(300)])
    ip.run_line_magic("tracin", "use split.train split.test text=texts")
    g = ip.run_line_magic("tracin", "outliers index k=12")                # the old documented name still works
    assert g.page_size == 12 and len(g.gallery.strips[0]["tiles"]) == 12
    t = g.gallery.strips[0]["tiles"][0]
    assert t["png"] is None and t["text"] == f"sentence number {t['index']}"
    with pytest.raises(UsageError, match="unknown option"):
        ip.run_line_magic("tracin", "outliers index colour=3")

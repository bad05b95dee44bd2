"""Open a run's feature browser in a real headless Chromium with the network off, and check what a
person sees: the home page lists every core latent with its lineage, and a core latent's card shows
its lineage and its contexts in every final DMSAE. Keeps screenshots.

    apt-get install -y chromium            # Debian's package
    python bench/browser_check.py runs/default [--core J] [--out bench/browser_screenshots]

The network is off for the browser: every request goes to a proxy on a closed port and host names
resolve nowhere, so anything the page tried to fetch from outside would fail (and be missing from
the DOM). Not in CI (no browser there): tests/test_distill.py parses the page and its data instead.
"""

from __future__ import annotations

import argparse
import html.parser
import json
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

OFFLINE = ["--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("no Chromium: apt-get install -y chromium")


def run_browser(url: str, *extra: str) -> str:
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", *OFFLINE, "--virtual-time-budget=10000", *extra, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


class Classes(html.parser.HTMLParser):
    """Counts the elements of each class, and the text inside elements of class ``within``."""

    def __init__(self, within: str):
        super().__init__()
        self.counts: dict[str, int] = {}
        self.within, self.depth, self.text = within, 0, []

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        for name in classes:
            self.counts[name] = self.counts.get(name, 0) + 1
        if self.depth or self.within in classes:
            self.depth += 1

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.text.append(data)


def parse(dom: str, within: str) -> Classes:
    parser = Classes(within)
    parser.feed(dom)
    return parser


def core_data(browser: Path) -> dict:
    text = (browser / "run.js").read_text()
    return json.loads(text[text.index(", ") + 2 : -3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--core", type=int, default=0, help="the core latent whose card is checked")
    parser.add_argument("--out", type=Path, default=Path("bench/browser_screenshots"))
    args = parser.parse_args()
    browser = (args.run_dir / "browser").resolve()
    index = core_data(browser)
    page = (browser / "index.html").as_uri()
    args.out.mkdir(parents=True, exist_ok=True)

    home = parse(run_browser(page, "--dump-dom"), "core-table")
    rows = home.counts.get("core-row", 0)
    assert home.counts.get("core-table") == 1 and rows == len(index["core"]), f"the home page lists {rows} of {len(index['core'])} core latents"
    print(f"home page: {rows} core latents listed with their lineage, {len(index['saes'])} final SAEs")

    carriers = [s for s in index["saes"] if str(args.core) in s["core_latents"]]
    card = parse(run_browser(f"{page}#core={args.core}", "--dump-dom"), "core-card")
    assert card.counts.get("core-card") == 1, f"no card for core latent {args.core}"
    assert card.counts.get("lineage") == 1, "the card has no lineage table"
    examples = card.counts.get("example", 0)
    assert examples > 0, "the card shows no contexts"
    assert card.counts.get("card", 0) == 1 + len(carriers), "not every final DMSAE that carries it is shown"
    entry = index["core"][args.core]
    print(f"core latent {args.core}: lineage {entry['key']}, selected in cycles {[s['cycle'] for s in entry['selections']]}, "
          f"{examples} contexts over {len(carriers)} final SAEs: {[s['name'] for s in carriers]}")
    sae = carriers[0]
    summary_text = (browser / f"{sae['name']}.summary.js").read_text()
    summary = json.loads(summary_text[summary_text.index(", ") + 2 : -3])
    latent = sae["core_latents"][str(args.core)]
    token = index["token_text"][str(summary[latent][3][0])].strip() or index["token_text"][str(summary[latent][3][0])]
    search = run_browser(f"{page}#sae={sae['name']}&q={quote(token)}", "--dump-dom")
    assert f'href="#sae={sae["name"]}&amp;latent={latent}"' in search, f"searching {token!r} does not find latent {latent}"
    last = sae["num_latents"] - 1
    assert parse(run_browser(f"{page}#sae={sae['name']}&latent={last}", "--dump-dom"), "latent-card").counts.get("latent-card") == 1
    print(f"search for its top token {token!r} in {sae['name']} finds it; latent {last} (the last) opens")
    for name, fragment in (("home", ""), (f"core-{args.core}", f"#core={args.core}")):
        shot = (args.out / f"{name}.png").resolve()
        run_browser(page + fragment, "--window-size=1400,1800", f"--screenshot={shot}")
        print(f"screenshot: {shot}")


if __name__ == "__main__":
    main()

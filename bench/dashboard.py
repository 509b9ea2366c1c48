"""The dashboard's cost: how fast its pages load, and what the server spends while one is open.

    python bench/dashboard.py [--rounds 3] [--seconds 20]

Needs Debian's chromium and chromium-driver, and selenium. One `forwardpass serve` of the demo repository;
per round, interleaved: the server's CPU time over --seconds with no browser, then with a headless Chromium
on the metrics page (it polls /metrics every 2 s and /v1/usage every 6 s). Page load: navigation start to
the load event, and to the models table shown (its one API call answered and drawn), from the browser's
own timing. Medians of the rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from engine import cpu_flags  # noqa: E402
from serve import free_port  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from forwardpass import demo

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = tempfile.mkdtemp(prefix="fp-dash-")
    server = subprocess.Popen([sys.executable, "-m", "forwardpass", "serve", str(demo.repository()), "--port", str(port),
                               "--poll-interval", "0", "--log-level", "warning"], env={**os.environ, "FORWARDPASS_STATE_DIR":
                              os.path.join(home, "state")}, stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        idle, open_, load, shown = [], [], [], []
        driver = browser()
        try:
            for _ in range(args.rounds):
                before = cpu_seconds(server.pid)
                time.sleep(args.seconds)
                idle.append((cpu_seconds(server.pid) - before) / args.seconds * 100)

                driver.get(url + "/")
                WebDriverWait(driver, 30, 0.02).until(lambda d: d.find_elements(By.CSS_SELECTOR, "tbody tr"))
                timing = driver.execute_script("const t = performance.getEntriesByType('navigation')[0]; "
                                               "return [t.loadEventEnd, performance.now()]")  # fmt: skip
                load.append(timing[0])
                shown.append(timing[1])
                driver.get(url + "/#/metrics")
                WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "main").get_attribute("data-polls"))
                before = cpu_seconds(server.pid)
                time.sleep(args.seconds)
                open_.append((cpu_seconds(server.pid) - before) / args.seconds * 100)
                driver.get("about:blank")
        finally:
            driver.quit()
    finally:
        server.terminate()
        server.wait(30)
    med = statistics.median
    print(f"CPU: {cpu_flags()}, {os.cpu_count()} cores; medians of {args.rounds} rounds of {args.seconds:g} s\n")
    print(f"page load (navigation start to load event):      {med(load):7.1f} ms   rounds {[round(v) for v in load]}")
    print(f"models table shown (its API call answered):      {med(shown):7.1f} ms   rounds {[round(v) for v in shown]}")
    print(f"server CPU, no dashboard open:                   {med(idle):7.2f} %    rounds {[round(v, 2) for v in idle]}")
    print(f"server CPU, the metrics page open (polling):     {med(open_):7.2f} %    rounds {[round(v, 2) for v in open_]}")
    print(f"added by an open dashboard:                      {med(open_) - med(idle):7.2f} % of one core")


if __name__ == "__main__":
    main()

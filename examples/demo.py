"""The whole pipeline on this machine: a scheduler (SQLite), a worker with two sandboxes, the
hash-puzzle job; prints each result, checks every nonce, stops everything cleanly.

Run with ``make demo``. Exits non-zero if any check fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE / "hash-puzzle"))

from check import show_results  # noqa: E402

from dcp_keys.identity import load_keystore  # noqa: E402
from scheduler.client import ComputeClient  # noqa: E402
from scheduler.local import LocalScheduler  # noqa: E402


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="dcp-demo-") as tmp:
        work = Path(tmp)
        passphrase = work / "passphrase"
        passphrase.write_text("correct horse battery staple\n")
        print("1. creating keystores (scrypt; a few seconds)")
        worker_addr = run(
            str(BIN / "dcp-wallet"),
            "create",
            "--out",
            str(work / "worker.json"),
            "--passphrase-file",
            str(passphrase),
        )
        owner_addr = run(
            str(BIN / "dcp-wallet"),
            "create",
            "--out",
            str(work / "owner.json"),
            "--passphrase-file",
            str(passphrase),
        )
        print(f"   worker identity {worker_addr}\n   job owner       {owner_addr}")

        print("2. starting the scheduler (SQLite, loopback, a free port)")
        scheduler = LocalScheduler(work / "scheduler.db")
        url = scheduler.url
        print(f"   {url}")

        print("3. starting a worker with 2 sandboxes")
        worker = subprocess.Popen(
            [
                str(BIN / "dcp-worker"),
                "--scheduler",
                url,
                "--identity",
                str(work / "worker.json"),
                "--passphrase-file",
                str(passphrase),
                "--sandboxes",
                "2",
                "--state-dir",
                str(work / "worker-state"),
                "-o",
                "console",  # plain logs, even on a terminal
            ]
        )
        failures = 0
        try:
            job_file = HERE / "hash-puzzle" / "job.toml"
            print(f"4. deploying {job_file.relative_to(HERE.parent)}")
            owner = load_keystore(work / "owner.json", passphrase.read_bytes().rstrip(b"\n"))
            db = str(work / "scheduler.db")
            run(str(BIN / "dcp-scheduler"), "bank", "mint", "--db", db, owner_addr, "1")
            print(
                "   minted 1 credit for the owner; the job escrows 0.01 per slice and pays the"
                " worker for each verified result"
            )
            prefixes = (HERE / "hash-puzzle" / "prefixes.txt").read_bytes().splitlines()
            difficulty = 20
            started = time.monotonic()
            with ComputeClient(url, owner) as client:
                job = client.deploy(job_file)
                print(f"   job {job}: {len(prefixes)} slices, {difficulty} leading zero bits\n")
                print(
                    "5. results, in slice order (the scheduler ran the job's verifier before"
                    " paying), checked again here with hashlib:"
                )
                results = client.results(job, wait=True, timeout=600)
                failures += show_results(results, prefixes, difficulty)
                balances = [client.account(a)["balance"] for a in (owner_addr, worker_addr)]
            elapsed = time.monotonic() - started
            print(f"\n   owner balance {balances[0]:.6f}, worker earned {balances[1]:.6f} credits")
        finally:
            print("\n6. stopping the worker (SIGINT: graceful) and the scheduler")
            worker.send_signal(signal.SIGINT)
            worker_rc = worker.wait(timeout=60)
            scheduler_rc = scheduler.stop(timeout=30)
        print(f"   worker exited {worker_rc}, scheduler exited {scheduler_rc}")
        verified = len(prefixes) - failures
        print(f"\n{verified}/{len(prefixes)} puzzle results verified in {elapsed:.1f} s")
        return 0 if failures == 0 and worker_rc == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

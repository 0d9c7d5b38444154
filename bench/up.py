"""`invoke up` against the same docker/compose commands in a plain shell script
(bench/plain_up.sh), images already built, from a clean state each time.
Target: invoke ≤ 1.05 × the script. Three alternating rounds; medians.
"""

import subprocess

from common import ROOT, instance_env, invoke, median, scratch, timed

ROUNDS = 3
INSTANCE = "bench-up"
PORT = 51880


def main():
    mounts = scratch("fbm-bench-up.")
    env = instance_env(INSTANCE, PORT, mounts)
    env.update(INSTANCE=INSTANCE, MOUNTS=str(mounts), PORT=str(PORT))

    def reset():
        invoke(env, "clean", "all", "--level", "config", "--yes")

    invoke(env, "up")  # builds what is missing and writes the compose env file
    config = (mounts / "vpnserver/run_mounts/config/config.env").read_text()
    env["PUBLIC_ADDR"] = config.split("VPN_SERVER_PUBLIC_ADDR=")[1].split()[0]

    tool, script = [], []
    try:
        for _ in range(ROUNDS):
            reset()
            tool.append(timed(lambda: invoke(env, "up")))
            reset()
            script.append(
                timed(
                    lambda: subprocess.run(
                        ["bash", str(ROOT / "bench/plain_up.sh")],
                        env=env,
                        check=True,
                        capture_output=True,
                    )
                )
            )
        again = timed(lambda: invoke(env, "up"))
    finally:
        reset()

    t, s = median(tool), median(script)
    print(f"invoke up (clean state):   median {t:.2f} s  {[round(x, 2) for x in tool]}")
    print(
        f"plain script, same steps: median {s:.2f} s  {[round(x, 2) for x in script]}"
    )
    print(f"ratio invoke/script: {t / s:.3f} (target <= 1.05)")
    print(f"invoke up again (nothing to do): {again:.2f} s")


if __name__ == "__main__":
    main()

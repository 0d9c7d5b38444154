"""The proof: a real federated training over the VPN, on this machine."""

from invoke import Exit, task

from fbmvpn import fedbiomed

from ._common import bring_up, open_stack, say, step


@task(
    help={
        "rounds": "federated rounds (at least 2)",
        "public_addr": "address peers use to reach the VPN server (default: detected)",
    }
)
def demo(ctx, rounds=2, public_addr=""):
    """Deploy vpnserver, node, node2 and researcher, then train over the VPN.

    Each node gets its share of scikit-learn's bundled breast cancer data as
    CSV (nothing is downloaded), Fed-BioMed starts with training plan approval
    on, the researcher asks for approval, the nodes approve, and the
    researcher trains a logistic regression (SGDClassifier, FedAvg). Ends with
    what each node sent per round and the traffic each tunnel carried.
    """
    rounds = int(rounds)
    if rounds < 2:
        raise Exit("demo: give --rounds 2 or more", code=1)
    stack = open_stack(ctx)
    nodes = fedbiomed.NODES
    bring_up(stack, nodes, public_addr)
    with step("demo"):
        report = fedbiomed.run_demo(stack, nodes, rounds)
    if stack.host.dry:
        return

    researcher = fedbiomed.researcher_ip(stack)
    for name in nodes:
        received, sent = report.tunnel_bytes[name]
        say(
            f"{name} ({report.vpn_ips[name]}) -> researcher "
            f"{', '.join(report.connections[name]) or researcher}: "
            f"{sent} bytes sent, {received} received through the tunnel"
        )
    labels = {ident: name for name, ident in report.node_ids.items()}
    for rnd, idents in sorted(report.replies.items(), key=lambda x: int(x[0])):
        senders = ", ".join(labels.get(i, i) for i in idents)
        say(f"round {int(rnd) + 1}: training replies from {senders}")
    say(f"aggregated model: {report.model} ({report.model_bytes} bytes)")
    times = ", ".join(f"{k} {v} s" for k, v in report.seconds.items())
    say(f"timings: {times}")
    problems = report.problems(rounds)
    if problems:
        raise Exit(f"demo failed: {'; '.join(problems)}", code=1)
    say(f"demo passed: {len(nodes)} nodes trained {rounds} rounds over the VPN")

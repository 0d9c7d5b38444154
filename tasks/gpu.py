"""`gpu.check`: does this machine meet the prerequisites of a GPU node?

The CUDA version that sets the minimum driver is `--cuda`, else
`fbm.gpu.cuda_version` (invoke.yaml, INVOKE_FBM_GPU_CUDA_VERSION); `auto`, the
default, reads the release the node image's torch was built for.
"""

from invoke import Collection, Exit, task

from fbmvpn import gpu
from fbmvpn.errors import FbmVpnError


def _configured_cuda(ctx) -> str:
    fbm = ctx.config.get("fbm") or {}
    setting = (fbm.get("gpu") or {}).get("cuda_version") or "auto"
    image = f"fedbiomed/vpn-node:{fbm.get('tag') or 'latest'}"
    return gpu.resolve_cuda(gpu.shell_runner(ctx), setting, image)


@task(
    help={
        "json": "print the results as JSON (for CI) instead of a table",
        "cuda": "CUDA version of the node image, which sets the minimum driver "
        "(default: fbm.gpu.cuda_version; auto reads it from the node image)",
    }
)
def check(ctx, json=False, cuda=None):
    """Check driver, container toolkit, docker runtime and compose for a GPU node.

    Exits non-zero when a prerequisite is missing; the table says how to fix it.
    """
    try:
        cuda = cuda or _configured_cuda(ctx)
        checks = gpu.run_checks(gpu.shell_runner(ctx), cuda)
    except FbmVpnError as error:
        raise Exit(f"gpu.check: {error}", code=1) from error

    print(gpu.to_json(checks) if json else gpu.render_table(checks))

    missing = [c.name for c in gpu.failed(checks)]
    if missing:
        where = "the fixes in the JSON output" if json else "the fixes above"
        raise Exit(
            f"GPU prerequisites not met: {', '.join(missing)}; see {where}", code=1
        )


ns = Collection("gpu", check)

"""Getting a torch module out of a SourceRef: local hub directories, GitHub hub repos, TorchScript files.

Trust rules: a local directory is the user's own code and runs without a flag. A GitHub repo runs someone
else's code, so it needs ``trust_repo`` (``--trust-repo``) or an ``OWNER_REPO`` line in torch.hub's own
``trusted_list``; porter checks that itself and only then lets torch.hub load it (with ``trust_repo=True``,
so torch never prompts). GitHub repos go through torch.hub's download and cache (``torch.hub.get_dir()``):
a cached repo loads with no network at all. Torch pickles are read with ``weights_only=True`` only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ...errors import ModelLoadError, NetworkError, SourceError, UnsafeModelError, UsageError, first_line
from ...sources import SourceRef

GITHUB = ("github.com", 443)
PROBE_TIMEOUT_S = 5.0  # how long porter waits for github.com before saying "offline"


@dataclass
class LoadedModule:
    module: Any  # torch.nn.Module (a ScriptModule for TorchScript files)
    what: str  # how messages name it: "hub entry point 'small_cnn' of fixtures/torchhub"
    provenance: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def load_module(ref: SourceRef, opts) -> LoadedModule:
    if ref.form == "hub-local":
        return load_local(ref, opts)
    if ref.form == "hub-remote":
        return load_remote(ref, opts)
    if ref.form == "torchscript":
        return load_torchscript(Path(ref.location))
    if ref.form == "state-dict":
        explain_state_dict(Path(ref.location))  # always raises
    if ref.form == "module":
        return LoadedModule(ref.obj, f"module {type(ref.obj).__name__}", {"torch_source": "module"})
    raise SourceError(f"{ref}: the torchhub importer does not read {ref.form!r} sources")


# --- local hub directories ------------------------------------------------------------------------------------

@contextlib.contextmanager
def _on_sys_path(directory: Path) -> Iterator[None]:
    """What torch.hub does while it imports a hubconf and calls an entry point: the repo is importable."""
    path = str(directory)
    sys.path.insert(0, path)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(path)


def import_hubconf(directory: Path, where: str):
    """Import ``directory/hubconf.py`` the way torch.hub does (module name ``hubconf``, repo on sys.path)."""
    hubconf = directory / "hubconf.py"
    if not hubconf.is_file():
        raise SourceError(f"{where} has no hubconf.py, so it is not a PyTorch Hub repo; point torchhub: at the "
                          f"directory that holds hubconf.py (torchhub:DIR:ENTRY)")
    spec = importlib.util.spec_from_file_location("hubconf", hubconf)
    module = importlib.util.module_from_spec(spec)
    with _on_sys_path(directory):
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the repo's own code failed
            raise ModelLoadError(f"importing {hubconf} failed: {type(e).__name__}: {first_line(e, 400)}") from e
    missing = [dep for dep in getattr(module, "dependencies", None) or () if importlib.util.find_spec(dep) is None]
    if missing:
        raise ModelLoadError(f"hub repo {where} needs package(s) that are not installed: {', '.join(missing)}; "
                             f"pip install them and try again")
    return module


def entry_points(module) -> list[str]:
    """The functions hubconf offers (what its users call): torch.hub.list's public callables less classes (the
    ones a hubconf imports or defines to build with: ``Net`` is not an entry point beside ``net``; naming a class
    still calls it, as torch.hub.load would)."""
    import inspect

    return sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))
                  and not inspect.isclass(getattr(module, n)))


def _callable(module, name: str) -> bool:
    """What torch.hub.load calls: any public callable, a class named on purpose included."""
    return not name.startswith("_") and callable(getattr(module, name, None))


def load_local(ref: SourceRef, opts) -> LoadedModule:
    directory = Path(ref.location).expanduser().resolve()
    module = import_hubconf(directory, ref.location)
    if not _callable(module, ref.entry):
        raise SourceError(_no_entry_message(ref.entry, ref.location, entry_points(module)))
    fn = getattr(module, ref.entry)
    what = f"hub entry point {ref.entry!r} of {ref.location}"
    with _on_sys_path(directory):
        model = call_entry(lambda: fn(**opts.hub_args), what, opts.hub_args, fn)
    provenance = {"torch_source": "hub-local", "hub_entry": ref.entry, "hub_args": _json(opts.hub_args)}
    return LoadedModule(model, what, provenance)


def _no_entry_message(entry: str, where: str, entries: list[str]) -> str:
    return (f"hub repo {where} has no entry point {entry!r}; its entry points are: "
            f"{', '.join(entries) if entries else '(none: hubconf.py defines no public callables)'}")


def call_entry(call: Callable[[], Any], what: str, hub_args: dict, fn: Callable | None = None):
    """Call an entry point; its failures become one-line porter errors that show its own message."""
    from urllib.error import URLError

    try:
        result = call()
    except TypeError as e:
        if hub_args and "argument" in str(e):
            sig = ""
            if fn is not None:
                with contextlib.suppress(TypeError, ValueError):
                    sig = f"; it takes {getattr(fn, '__name__', 'entry')}{inspect.signature(fn)}"
            raise UsageError(f"{what} rejected the hub arguments {_json(hub_args)}: {first_line(e, 400)}{sig}") from e
        raise ModelLoadError(f"{what} raised TypeError: {first_line(e, 400)}") from e
    except (URLError, ConnectionError, socket.timeout) as e:
        raise NetworkError(f"{what} tried to download something and failed ({first_line(e, 400)}); it needs the "
                           f"network, or its files in torch.hub's cache ({_hub_dir()})") from e
    except Exception as e:  # noqa: BLE001 - the repo's own code failed: show its message
        raise ModelLoadError(f"{what} raised {type(e).__name__}: {first_line(e, 400)}") from e
    return _as_module(result, what)


def _as_module(result: Any, what: str):
    import torch

    if isinstance(result, torch.nn.Module):
        return result
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], torch.nn.Module):
        return result[0]  # (model, transforms) and similar pairs: the model comes first
    raise SourceError(f"{what} returned a {type(result).__module__}.{type(result).__qualname__}, not a "
                      f"torch.nn.Module; porter converts entry points that build models")


# --- GitHub hub repos through torch.hub -------------------------------------------------------------------------

def _hub_dir() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir())


def trusted_repos(hub_dir: Path) -> set[str]:
    """``OWNER_REPO`` lines of torch.hub's trusted_list (written by torch.hub when a user trusts a repo)."""
    try:
        return {line.strip() for line in (hub_dir / "trusted_list").read_text().splitlines() if line.strip()}
    except OSError:
        return set()


def cached_dir(hub_dir: Path, owner: str, name: str, ref: str) -> Path:
    """Where torch.hub keeps a downloaded repo: ``<hub_dir>/OWNER_REPO_REF`` (slashes in REF become _)."""
    return hub_dir / f"{owner}_{name}_{ref.replace('/', '_')}"


def github_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    try:
        socket.create_connection(GITHUB, timeout=timeout).close()
        return True
    except OSError:
        return False


def load_remote(ref: SourceRef, opts) -> LoadedModule:
    import torch.hub

    owner, name = ref.location.split("/")
    hub_dir = _hub_dir()
    repo = f"{owner}/{name}"
    if not opts.trust_repo and f"{owner}_{name}" not in trusted_repos(hub_dir):
        raise UnsafeModelError(
            f"torchhub:{repo} runs code from the GitHub repo {repo}, which is not in torch.hub's trusted list "
            f"({hub_dir / 'trusted_list'}); pass --trust-repo (trust_repo=True) if you trust its code")
    git_ref = ref.ref
    if git_ref is None:  # torch.hub asks GitHub for the default branch; a cached main/master answers offline
        git_ref = next((b for b in ("main", "master") if cached_dir(hub_dir, owner, name, b).is_dir()), None)
    spelled = f"{repo}:{git_ref}" if git_ref else repo
    cached = git_ref is not None and cached_dir(hub_dir, owner, name, git_ref).is_dir()
    if not cached and not github_reachable():
        expected = cached_dir(hub_dir, owner, name, git_ref or "main")
        raise NetworkError(f"offline: {spelled} is not in torch.hub's cache ({hub_dir}) and github.com can't be "
                           f"reached to download it; connect once to cache it, or put a copy of the repo at {expected}")
    # Trust was checked above, so torch.hub may load without asking (it records the repo in its trusted_list).
    entries = _hub_call(lambda: torch.hub.list(spelled, trust_repo=True, verbose=False), spelled, hub_dir)
    if git_ref is None:  # now downloaded: pin the branch torch.hub chose so the load below stays offline
        git_ref = next((b for b in ("main", "master") if cached_dir(hub_dir, owner, name, b).is_dir()), None)
        spelled = f"{repo}:{git_ref}" if git_ref else repo
    if ref.entry not in entries:
        raise SourceError(_no_entry_message(ref.entry, spelled, sorted(entries)))
    what = f"hub entry point {ref.entry!r} of {spelled}"
    model = call_entry(lambda: torch.hub.load(spelled, ref.entry, trust_repo=True, verbose=False, **opts.hub_args),
                       what, opts.hub_args)
    provenance = {"torch_source": "hub-remote", "hub_repo": repo, "hub_ref": git_ref or "", "hub_entry": ref.entry,
                  "hub_args": _json(opts.hub_args)}
    notes = [] if cached else [f"downloaded {spelled} into torch.hub's cache ({hub_dir})"]
    return LoadedModule(model, what, provenance, notes)


def _hub_call(call: Callable[[], Any], spelled: str, hub_dir: Path):
    """Run a torch.hub download/list step, turning its failures into porter errors."""
    from urllib.error import HTTPError, URLError

    try:
        return call()
    except HTTPError as e:
        if e.code == 404:
            raise SourceError(f"GitHub has no repo or ref {spelled} (HTTP 404); check OWNER/REPO[:REF]") from e
        raise NetworkError(f"downloading {spelled} from GitHub failed: HTTP {e.code} {e.reason}") from e
    except (URLError, ConnectionError, socket.timeout) as e:
        raise NetworkError(f"offline or GitHub unreachable while fetching {spelled} ({first_line(e, 400)}); a repo in "
                           f"torch.hub's cache ({hub_dir}) loads without the network") from e
    except ValueError as e:
        if "Cannot find" in str(e):
            raise SourceError(f"{spelled}: {first_line(e, 400)}") from e
        raise ModelLoadError(f"importing hubconf.py of {spelled} failed: ValueError: {first_line(e, 400)}") from e
    except RuntimeError as e:
        if "no internet connection" in str(e):
            raise NetworkError(f"offline: {spelled} is not in torch.hub's cache ({hub_dir})") from e
        raise ModelLoadError(f"hub repo {spelled} failed to load: {first_line(e, 400)}") from e
    except Exception as e:  # noqa: BLE001 - the repo's hubconf raised while torch.hub imported it
        raise ModelLoadError(f"importing hubconf.py of {spelled} failed: {type(e).__name__}: {first_line(e, 400)}") from e


# --- files ------------------------------------------------------------------------------------------------------

def load_torchscript(path: Path) -> LoadedModule:
    import torch

    # torch.jit.load is acceptable for untrusted files where torch.load(weights_only=False) is not: a TorchScript
    # archive holds TorchScript code, compiled and run by the TorchScript interpreter (which has no access to
    # Python builtins, imports or the os module), and tensors/constants read by TorchScript's own restricted
    # unpickler, which only rebuilds tensors and TorchScript types. No Python pickle opcode can name and call an
    # arbitrary Python function, so loading runs no Python code from the file.
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - corrupt or truncated archive
        raise ModelLoadError(f"{path} can't be read as a TorchScript archive: {first_line(e, 400)}; check that the file "
                             f"is complete (torch.jit.save / ScriptModule.save writes one)") from e
    return LoadedModule(module, f"TorchScript file {path.name}", {"torch_source": "torchscript"})


def explain_state_dict(path: Path) -> None:
    """A torch pickle that is not TorchScript holds no architecture: say what it is and what to do instead."""
    import pickle

    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeModelError(
            f"{path} is a pickled Python object (such as a whole model saved with torch.save(model)); porter loads "
            f"torch pickles only with weights_only=True, which refuses it because unpickling would run code; save "
            f"the model as TorchScript (torch.jit.script(model).save(PATH)) or convert it in Python with "
            f"porter.convert(model)") from e
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"{path} can't be read as a torch file: {first_line(e, 400)}") from e
    tensors = _count_tensors(obj)
    keys = [k for k in obj if isinstance(k, str)][:3] if isinstance(obj, dict) else []
    shown = f", e.g. {', '.join(keys)}" if keys else ""
    raise ModelLoadError(
        f"{path} holds a plain state dict ({tensors} tensors{shown}): weights without the architecture, which porter "
        f"can't rebuild from the file alone; convert through a hub entry point that builds the model and loads these "
        f"weights (torchhub:DIR:ENTRY), or build it in Python, load_state_dict, and call porter.convert(model)")


def _count_tensors(obj: Any) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_count_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(v) for v in obj)
    return 0


# --- helpers ------------------------------------------------------------------------------------------------------



def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)

"""Publishing a DMSAE run on the Hugging Face Hub.

Layout on the Hub
-----------------
A run goes to one **run repo** ``ORG/NAME``; every transfer-stage SAE to a repo of its own::

    ORG/NAME                                 (model repo, branch main)
      README.md                              card of the newest cycle; at the end, of the distilled core
      configuration_dmsae.py, modeling_dmsae.py,  the model code, at the root: transformers looks for
      interventions.py                       remote code there even when loading with subfolder=
      cycle-0/ ... cycle-T/                  one folder per cycle t, pushed by one commit tagged ``cycle-t``:
          config.json, model.safetensors,    the cycle's SAE (AutoModel, subfolder="cycle-t")
          configuration_dmsae.py, modeling_dmsae.py, interventions.py
          core.json, core_directions.safetensors   the core C(t) it selected (indices, scores, lineage, directions)
          metrics.json, README.md            its metrics and card
          latent_evidence.safetensors, latent_evidence.json, firing_frequencies.safetensors
                                             per-latent evidence on held-out tokens (modeling_dmsae.evidence)
      distilled_core/                        C* = C(T) ∩ C(T-1); pushed with figures/, browser/ and
      figures/                               run_config.yaml by the last commit, tagged ``distilled``
      browser/                               the offline feature browser (index.html and its *.js data)
      run_config.yaml

    ORG/dmsae-gemma2-l12-k80                 (one per transfer SAE; name from ``HubSettings.sae_repo_pattern``)
      config.json, model.safetensors, configuration_dmsae.py, modeling_dmsae.py, interventions.py,
      metrics.json, README.md, latent_evidence.safetensors, latent_evidence.json, firing_frequencies.safetensors
      saelens/cfg.json, saelens/sae_weights.safetensors   the same SAE in SAELens's format (JumpReLU)

So ``ORG/NAME@cycle-7`` (tag ``cycle-7``, folder ``cycle-7/``) is cycle 7's SAE and core, and
``AutoModel.from_pretrained("ORG/dmsae-gemma2-l12-k80")`` loads a final SAE (with ``modeling_dmsae``
imported, or with ``trust_remote_code=True``).

Locally, ``build_hub_folders`` writes the same trees into ``RUN_DIR/hub``: ``hub/run/`` mirrors the
run repo's main branch and ``hub/saes/<repo name>/`` each SAE repo. Without a repo id the folders
(and cards) name the placeholder ``your-org/<run dir name>``.

Pushing
-------
Each cycle, the distilled core and each SAE is one *unit*: one commit (plus a tag in the run repo).
A unit whose files are already on the Hub with the same hashes is skipped, so re-running a push
uploads nothing twice; transient failures (network errors, HTTP 5xx/429) are retried with backoff,
and every attempt re-reads the Hub first, so a commit whose answer was lost is never made twice. A
failure raises :class:`HubPushError` naming the repo and what failed; the run directory is never
modified by a push, and ``--push-only RUN_DIR`` pushes what is missing later. The token is taken
from the environment / ``hf auth login`` and never written anywhere.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.sha import git_hash, sha_fileobj

from hub_cards.cards import CardSettings, card_dataset, cycle_core_card, distilled_core_card, final_sae_card
from modeling_dmsae import DMSAEConfig, DMSAEModel
from modeling_dmsae.convert_checkpoints import to_saelens
from trainer.config import DISTILLED_TAG, DataConfig, HubSettings
from trainer.errors import ConfigError, HubPushError
from trainer.run.files import atomic_folder, link_or_copy, require_files, write_text
from trainer.run.hub_names import run_repo_id, sae_repo_id
from trainer.run.layout import (
    BROWSER_FOLDER,
    CORE_JSON,
    CYCLE_FILES,
    DISTILLED_FOLDER,
    FIGURES_FOLDER,
    METRICS_JSON,
    RUN_CONFIG,
    RunDirectory,
    cycle_number,
    hub_cycle_folder,
)
from trainer.run.metrics_file import SAEMetrics
from trainer.run.stages import FinalSAE

logger = logging.getLogger(__name__)

# The model code transformers runs with trust_remote_code; it looks for it at the repo root.
CODE_FILES = ("configuration_dmsae.py", "modeling_dmsae.py", "interventions.py")
SAELENS_FOLDER = "saelens"
# Top-level paths of a run repo that this module writes; anything else means the repo is not ours.
RUN_REPO_OWNED = re.compile(
    r"^(\.gitattributes|README\.md|run_config\.yaml|configuration_dmsae\.py|modeling_dmsae\.py|interventions\.py|cycle-\d+/.+|distilled_core/.+|figures/.+|browser/.+)$"
)
PUBLISHED_SUFFIXES = (".json", ".safetensors", ".py", ".md", ".png", ".html", ".js")
# Files never scanned for a leaked token (large binary weights).
BINARY_SUFFIXES = (".safetensors", ".png", ".bin")

T = TypeVar("T")


class PushUnit(NamedTuple):
    """One commit: ``files`` (path in repo -> local file) land in ``repo_id`` on main; ``tag``
    then marks that commit. ``root_card`` is written as the repo's README.md too, unless the run
    has already been finalized on the Hub."""

    repo_id: str
    tag: str | None
    files: dict[str, Path]
    message: str
    root_card: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.repo_id}@{self.tag}" if self.tag else self.repo_id


class PushReport(NamedTuple):
    pushed: list[str]
    """Units committed by this call (``repo`` or ``repo@tag``)."""
    skipped: list[str]
    """Units already on the Hub with identical files."""


class HubAuthError(HubPushError):
    """No token, or the Hub rejected it."""


class HubRepoConflictError(HubPushError):
    """The target repo holds content that is not this run's."""


def _retry_hint(run_dir: Path) -> str:
    return (
        f"Nothing was lost: every file is still in {run_dir} (Hub-ready copies in {run_dir / 'hub'}). "
        f"Push it later with --push-only {run_dir}."
    )


# ----------------------------------------------------------------------------------------
# Building the Hub-ready folders
# ----------------------------------------------------------------------------------------


def _mirror_folder(source: Path, target: Path) -> None:
    """Link the published files of ``source`` (top level only: a checkpoint or scratch folder
    the trainer keeps beside them is never pushed) into ``target``."""
    for path in _files(source):
        link_or_copy(path, target / path.name)


def _card_settings(paths: RunDirectory, settings: HubSettings) -> CardSettings:
    datasets = settings.datasets or [paths.configuration().data.dataset]
    return CardSettings(
        run_repo_id=run_repo_id(settings, paths), license=settings.license, datasets=[card_dataset(d) for d in datasets]
    )


def saelens_export_settings(data: DataConfig) -> dict:
    """context_size and prepend_bos of a run's SAELens exports, from its data configuration. An unset
    data.prepend_bos means BOS whenever the tokenizer has one, which is what SAELens's prepend_bos=True
    does (TransformerLens prepends the tokenizer's BOS token)."""
    return {"context_size": data.context_length, "prepend_bos": True if data.prepend_bos is None else data.prepend_bos}


def build_cycle_folder(paths: RunDirectory, cycle: int, settings: HubSettings) -> PushUnit:
    """Write ``RUN_DIR/hub/run/cycle-<t>/`` (the cycle's files and card) and return its push unit."""
    source = paths.cycle(cycle)
    require_files(source, CYCLE_FILES, f"delete {source} and rerun the run with --run.resume true: cycle {cycle} is trained again")
    folder = hub_cycle_folder(cycle)
    target = paths.hub_run / folder
    with atomic_folder(target) as staging:
        _mirror_folder(source, staging)
        card = cycle_core_card(source, _card_settings(paths, settings), revision=folder, subfolder=folder)
        write_text(staging / "README.md", str(card))
    files = {f"{folder}/{path.name}": path for path in _files(target)}
    for name in CODE_FILES:  # where trust_remote_code finds them for every cycle's subfolder
        link_or_copy(target / name, target.parent / name)
        files[name] = target.parent / name
    return PushUnit(run_repo_id(settings, paths), folder, files, f"Cycle {cycle}: SAE and core C({cycle})", target / "README.md")


def build_distilled_folder(paths: RunDirectory, settings: HubSettings) -> PushUnit | None:
    """Write the run repo's distilled core, figures, run config and root card; None before the
    run has a distilled core."""
    if not (paths.distilled_core / CORE_JSON).exists():
        return None
    target = paths.hub_run
    folders = ((paths.distilled_core, DISTILLED_FOLDER), (paths.figures, FIGURES_FOLDER), (paths.browser, BROWSER_FOLDER))
    for local, folder in folders:
        if local.is_dir():
            with atomic_folder(target / folder) as staging:
                _mirror_folder(local, staging)
    if paths.config_file.exists():
        link_or_copy(paths.config_file, target / RUN_CONFIG)
    last_cycle = paths.cycles()[-1]
    card = distilled_core_card(paths, last_cycle, _card_settings(paths, settings), subfolder=hub_cycle_folder(cycle_number(last_cycle)))
    write_text(target / "README.md", str(card))
    files = {"README.md": target / "README.md", RUN_CONFIG: target / RUN_CONFIG}
    for _, folder in folders:
        files.update({f"{folder}/{path.name}": path for path in _files(target / folder)})
    files = {path: local for path, local in files.items() if local.exists()}
    return PushUnit(run_repo_id(settings, paths), DISTILLED_TAG, files, "Distilled core C*, figures and run configuration")


def build_sae_folders(paths: RunDirectory, settings: HubSettings) -> list[PushUnit]:
    """Write ``RUN_DIR/hub/saes/<repo name>/`` for every transfer-stage SAE."""
    run_repo = run_repo_id(settings, paths)
    export_settings = saelens_export_settings(paths.configuration().data)
    card_settings = _card_settings(paths, settings)  # the run's configuration, read once for every SAE
    units, sources = [], {}
    for sae_dir in paths.transfers():
        config = DMSAEConfig.from_pretrained(sae_dir)
        metrics = SAEMetrics.read(sae_dir / METRICS_JSON)
        repo_id = sae_repo_id(config, FinalSAE.from_metrics(metrics), run_repo, settings)
        if repo_id in sources:
            raise ConfigError(
                f"transfer SAEs {sources[repo_id]} and {sae_dir} would both go to {repo_id}: add {{variant}} "
                f"or another field to --hub.sae_repo_pattern ({settings.sae_repo_pattern!r})"
            )
        sources[repo_id] = sae_dir
        target = paths.hub_saes / repo_id.split("/")[-1]
        with atomic_folder(target) as staging:
            _mirror_folder(sae_dir, staging)
            card = final_sae_card(sae_dir, card_settings, repo_id=repo_id)
            write_text(staging / "README.md", str(card))
            to_saelens(DMSAEModel.from_pretrained(sae_dir), staging / SAELENS_FOLDER, overwrite=True, **export_settings)
        files = {path.name: path for path in _files(target)}
        files.update({f"{SAELENS_FOLDER}/{path.name}": path for path in _files(target / SAELENS_FOLDER)})
        units.append(PushUnit(repo_id, None, files, f"DMSAE k={config.k} ({config.variant}) from {run_repo}"))
    return units


def build_hub_folders(paths: RunDirectory, settings: HubSettings) -> list[PushUnit]:
    """Write every Hub-ready folder of a run into ``RUN_DIR/hub`` (cards included) and return the
    push units in push order: cycles, the distilled core, the transfer SAEs."""
    units = [build_cycle_folder(paths, cycle_number(folder), settings) for folder in paths.cycles()]
    distilled = build_distilled_folder(paths, settings)
    return units + ([distilled] if distilled else []) + build_sae_folders(paths, settings)


def _files(folder: Path) -> list[Path]:
    """The files of a flat Hub folder: weights, configs, code, cores, metrics, cards, figures."""
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in PUBLISHED_SUFFIXES and not p.name.startswith(".")]


# ----------------------------------------------------------------------------------------
# Pushing
# ----------------------------------------------------------------------------------------


def authenticated_api(token: str | None = None) -> HfApi:
    """An HfApi with a token the Hub accepts, or a HubAuthError saying how to get one."""
    token = token or get_token()
    if not token:
        raise HubAuthError(
            "No Hugging Face token found: set the HF_TOKEN environment variable or run `hf auth login` "
            "with a token that has write access."
        )
    api = HfApi(token=token)
    try:
        user = api.whoami()
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 401:
            raise HubAuthError(
                f"The Hub at {api.endpoint} rejected the Hugging Face token (401 Unauthorized): it is invalid, "
                "expired or revoked. Create a new token with write access and set HF_TOKEN or run "
                "`hf auth login --force`."
            ) from None
        raise
    logger.info("pushing to %s as %s", api.endpoint, user.get("name"))
    return api


def push_cycle(paths: RunDirectory, cycle: int, settings: HubSettings, token: str | None = None) -> PushReport:
    """Build and push one cycle's folder (call after each cycle). Raises HubPushError."""
    return push_units(paths.root, [build_cycle_folder(paths, cycle, settings)], settings, token)


def push_run(paths: RunDirectory, settings: HubSettings, token: str | None = None) -> PushReport:
    """Build and push everything of a run that is not on the Hub yet (end of a run, ``--push-only``)."""
    return push_units(paths.root, build_hub_folders(paths, settings), settings, token)


class HubPublisher(NamedTuple):
    """The run's publisher (``trainer.pipeline.context.Publisher``), handed to the pipeline by
    ``distill.py``: the Hub code reads the run folder the pipeline writes, and is never imported by it."""

    paths: RunDirectory
    settings: HubSettings

    def build_folders(self) -> None:
        build_hub_folders(self.paths, self.settings)

    def push_cycle(self, cycle: int) -> PushReport:
        return push_cycle(self.paths, cycle, self.settings)

    def push_run(self) -> PushReport:
        return push_run(self.paths, self.settings)


def push_units(run_dir: Path, units: list[PushUnit], settings: HubSettings, token: str | None = None) -> PushReport:
    """Push ``units`` in order, skipping those already on the Hub. Any failure is a HubPushError
    that names what failed and how to retry; nothing in ``run_dir`` is changed."""
    if not settings.repo_id:
        raise ConfigError("--hub.repo_id is empty: pass --push-to-hub ORG/NAME to say where the run goes")
    if constants.is_offline_mode():
        raise HubPushError(f"HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset it to push.\n{_retry_hint(run_dir)}")
    try:
        api = _retrying(lambda: authenticated_api(token), settings, "reach the Hub")
        _refuse_leaked_token(units, api.token)
        pushed, skipped, checked = [], [], set()
        for unit in units:
            if unit.repo_id not in checked:
                _retrying(lambda unit=unit: _prepare_repo(api, unit, settings), settings, f"create or check {unit.repo_id}")
                checked.add(unit.repo_id)
            done = _retrying(lambda unit=unit: _push_unit(api, unit), settings, f"push {unit.name}")
            (pushed if done else skipped).append(unit.name)
            logger.info("%s %s", "pushed" if done else "already on the Hub:", unit.name)
    except HubPushError as error:
        raise type(error)(f"{error}\n{_retry_hint(run_dir)}") from error.__cause__
    except (HfHubHTTPError, httpx2.TransportError, OSError) as error:
        raise HubPushError(f"Pushing {run_dir} to the Hub failed: {_describe(error)}\n{_retry_hint(run_dir)}") from error
    return PushReport(pushed, skipped)


def _describe(error: Exception) -> str:
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return f"HTTP {error.response.status_code} from {error.response.request.method} {error.response.url.path}: {error}"
    return f"{type(error).__name__}: {error}"


def _refuse_leaked_token(units: list[PushUnit], token: str) -> None:
    for unit in units:
        for path_in_repo, local in unit.files.items():
            if not local.name.endswith(BINARY_SUFFIXES) and token.encode() in local.read_bytes():
                raise HubPushError(
                    f"{local} contains your Hugging Face token; refusing to push it to {unit.repo_id}/{path_in_repo}. "
                    "Remove the token from that file (tokens belong in HF_TOKEN or `hf auth login`)."
                )


def _is_transient(error: Exception) -> bool:
    if isinstance(error, OfflineModeIsEnabled):
        return False
    if isinstance(error, (httpx2.TransportError, ConnectionError)):
        return True
    response = getattr(error, "response", None)
    return isinstance(error, HfHubHTTPError) and response is not None and (response.status_code >= 500 or response.status_code in (408, 429))


def _retrying(action: Callable[[], T], settings: HubSettings, what: str) -> T:
    """Run ``action``; on a transient failure wait (doubling) and run it again, up to
    ``settings.max_attempts`` times. Every action re-reads the Hub, so retrying is safe."""
    wait = settings.retry_wait_s
    for attempt in range(1, settings.max_attempts + 1):
        try:
            return action()
        except Exception as error:
            if not _is_transient(error):
                raise
            if attempt == settings.max_attempts:
                raise HubPushError(
                    f"Could not {what}: the Hub kept failing after {attempt} attempts ({_describe(error)})."
                ) from error
            logger.warning("%s failed (%s); retrying in %.1f s (%d/%d)", what, _describe(error), wait, attempt, settings.max_attempts)
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def _prepare_repo(api: HfApi, unit: PushUnit, settings: HubSettings) -> None:
    """Create the unit's repo if needed and refuse one that holds something other than DMSAE files."""
    repo_id = unit.repo_id
    try:
        api.create_repo(repo_id, private=settings.private, exist_ok=True)
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 403:
            raise HubAuthError(
                f"The token cannot create or write {repo_id} (403 Forbidden): use a token with write access to "
                f"the '{repo_id.split('/')[0]}' namespace, or push to a namespace you own."
            ) from None
        raise
    remote = _remote_files(api, repo_id, "main")
    foreign = sorted(path for path in remote if not _owned(unit, path))
    if not foreign and "README.md" in remote:
        card_tags = (api.model_info(repo_id).card_data or {}).get("tags") or []
        foreign = [] if "dmsae" in card_tags else ["README.md (a card without the 'dmsae' tag)"]
    if not foreign and "config.json" in remote:
        model_type = json.loads(Path(api.hf_hub_download(repo_id, "config.json")).read_text()).get("model_type")
        foreign = [] if model_type == DMSAEConfig.model_type else [f"config.json of a {model_type!r} model"]
    if foreign:
        raise HubRepoConflictError(
            f"{repo_id} already exists and holds files that are not from a DMSAE run ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); refusing to push into it. Choose another repo name "
            f"(--push-to-hub ORG/OTHER_NAME, or HubSettings.sae_repo_pattern for SAE repos), or delete or rename {repo_id} on the Hub."
        )


def _owned(unit: PushUnit, path: str) -> bool:
    """Paths this module writes: the run repo's layout, or the files of an SAE repo."""
    if unit.tag is not None:
        return bool(RUN_REPO_OWNED.match(path))
    return path in unit.files or path == ".gitattributes"


def _remote_files(api: HfApi, repo_id: str, revision: str) -> dict[str, RepoFile]:
    return {f.path: f for f in api.list_repo_tree(repo_id, recursive=True, revision=revision) if isinstance(f, RepoFile)}


def _same_file(local: Path, remote: RepoFile | None) -> bool:
    """Same bytes: LFS/Xet files by sha256, regular files by git blob id (what the Hub lists)."""
    if remote is None:
        return False
    if remote.lfs is not None:
        return remote.lfs.size == local.stat().st_size and _sha256(local) == remote.lfs.sha256
    return remote.size == local.stat().st_size and git_hash(local.read_bytes()) == remote.blob_id


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return sha_fileobj(file).hex()


def _differing(files: dict[str, Path], remote: dict[str, RepoFile]) -> list[str]:
    return [path for path, local in files.items() if not _same_file(local, remote.get(path))]


def _push_unit(api: HfApi, unit: PushUnit) -> bool:
    """Commit (and tag) ``unit`` unless the Hub already has it; True when something was pushed."""
    refs = api.list_repo_refs(unit.repo_id)
    if unit.tag and unit.tag in {tag.name for tag in refs.tags}:
        differing = _differing(unit.files, _remote_files(api, unit.repo_id, unit.tag))
        if differing:
            raise HubRepoConflictError(
                f"Tag {unit.tag} of {unit.repo_id} holds other files than this run ({', '.join(differing[:3])} differ): "
                f"the repo holds another run. Push to a new repo (--push-to-hub ORG/OTHER_NAME) or delete the tag "
                f"{unit.tag} on the Hub to replace it."
            )
        return False
    remote = _remote_files(api, unit.repo_id, "main")
    differing = _differing(unit.files, remote)
    operations = [CommitOperationAdd(path, str(unit.files[path])) for path in differing]
    finalized = any(path.startswith(f"{DISTILLED_FOLDER}/") for path in remote)
    if unit.root_card is not None and not finalized and not _same_file(unit.root_card, remote.get("README.md")):
        operations.append(CommitOperationAdd("README.md", str(unit.root_card)))
    if operations:
        commit = api.create_commit(unit.repo_id, operations, commit_message=unit.message)
        revision = commit.oid
    else:
        revision = next(branch.target_commit for branch in refs.branches if branch.name == "main")
    if unit.tag:
        api.create_tag(unit.repo_id, tag=unit.tag, revision=revision, tag_message=unit.message, exist_ok=True)
    return bool(operations) or unit.tag is not None

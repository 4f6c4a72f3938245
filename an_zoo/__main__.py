"""``python -m an_zoo``: prepare weights for air-gapped machines.

    python -m an_zoo list                       # manifest weights and whether they are published / cached
    python -m an_zoo download an_resnet50       # fill the Hugging Face cache (HF_HOME / HF_HUB_CACHE), verified
    python -m an_zoo download an_resnet50.aog_e120_in1k --accept-license   # not on the Hub: the official release
    python -m an_zoo verify                     # re-hash every cached an_zoo weight against the manifest / lock
    python -m an_zoo bundle an_resnet50 DIR     # relocatable folder: weights + config.json + model card + hubconf.py
    python -m an_zoo import-official an_resnet50.aog_e120_in1k [--from ZIP]   # maintainers: Hub-ready folder

A bundle loads with no network access: ``timm.create_model('local-dir:DIR', pretrained=True)`` (after
``import an_zoo``) reads only data from DIR (config.json, and the weight file, verified against the an_zoo manifest
or the config's sha256). ``torch.hub.load('DIR', 'model', source='local')`` instead imports DIR/hubconf.py, which
runs whatever Python that file holds with your permissions: use it only on a bundle you made or trust.
"""
import argparse
import difflib
import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from ._manifest import WeightEntry, load_manifest, weight_entry
from .hub import WeightsUnavailableError, WeightsVerificationError, fetch_weights, hub_settings, verify_file

_BUNDLE_HUBCONF = '''"""torch.hub entry points of this an_zoo bundle ({name}); needs `pip install an_zoo`, no network.

torch.hub.load(folder, 'model', source='local') runs this file as Python. As written by `python -m an_zoo bundle` it
only calls timm.create_model('local-dir:<this folder>'), which reads config.json and the verified weight file; check
that it still says so before loading a bundle from someone else, or load it with timm.create_model('local-dir:...'),
which runs no code from the folder.
"""
import os

dependencies = ['torch', 'timm', 'an_zoo']


def model(pretrained: bool = True, **kwargs):
    """{name} from this folder (weights verified against config.json before loading)."""
    import an_zoo  # noqa: F401  (registers the an_* models)
    import timm
    folder = os.path.dirname(os.path.abspath(__file__))
    return timm.create_model('local-dir:' + folder, pretrained=pretrained, **kwargs)


{arch} = model
'''


def _resolve(name: str) -> WeightEntry:
    """``arch.tag`` or ``arch`` (its published weight, if exactly one) -> manifest entry."""
    entry = weight_entry(name)
    if entry is None:
        candidates = [e for e in load_manifest() if name in e.architectures and e.published]
        if len(candidates) != 1:
            known = ', '.join(e.name + ('' if e.published else ' (not published)') for e in load_manifest())
            names = sorted({e.name for e in load_manifest()} | {e.model for e in load_manifest()})
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
            hint = f' Did you mean {" or ".join(close)}?' if close else ''
            raise SystemExit(f'unknown or ambiguous weight {name!r}.{hint} The manifest has: {known}')
        entry = candidates[0]
    if not entry.published and not entry.official_source:
        raise SystemExit(f'{entry.name} is not published on the Hub yet and has no official source '
                         f'(see weights_manifest.json)')
    return entry


def _cached_path(entry: WeightEntry, cache_dir: str) -> Optional[Path]:
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache(entry.hf_hub_id, entry.filename, cache_dir=cache_dir, revision=entry.revision)
    return Path(found) if isinstance(found, str) else None


def cmd_list(args: argparse.Namespace) -> int:
    cache_dir = args.cache_dir or hub_settings()['cache_dir']
    from .official import read_lock
    for entry in load_manifest():
        state = 'published' if entry.published else 'official source' if entry.official_source else 'not published'
        cached = (_cached_path(entry, cache_dir) is not None if entry.published else read_lock(entry) is not None)
        aliases = ', '.join(f'{a}.{entry.tag}' for a in entry.aliases)
        print(f'{entry.name:45s} {state:14s} {"cached" if cached else "":6s} {f"(also {aliases})" if aliases else ""}'
              .rstrip())
    return 0


def _accept(entry: WeightEntry, accept: bool) -> None:
    if accept and entry.official_source:
        from .licenses import accept_license
        accept_license(entry.official_source['license'])
        print(f'accepted the {entry.license["name"]} ({entry.license["terms"]}: {entry.license["link"]}); '
              f'remembered in the an_zoo cache')


def cmd_download(args: argparse.Namespace) -> int:
    names = [e.name for e in load_manifest() if e.published] if args.all else args.names
    if not names:
        raise SystemExit('name one or more weights, or pass --all')
    for name in names:
        entry = _resolve(name)
        if entry.published:
            path = fetch_weights(entry, cache_dir=args.cache_dir)
            print(f'{entry.name}: {path} (sha256 verified)')
            continue
        from .official import fetch_official
        _accept(entry, args.accept_license)
        path = fetch_official(entry, source=args.source)
        print(f'{entry.name}: {path} (converted from the official release, verified against its lock file)')
    return 0


def cmd_import_official(args: argparse.Namespace) -> int:
    from .official import import_official
    entry = weight_entry(args.name)
    if entry is None or not entry.official_source:
        raise SystemExit(f'{args.name} is not a manifest weight with an official source: see python -m an_zoo list')
    _accept(entry, args.accept_license)
    import_official(entry, source=args.source, out_dir=args.out)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    cache_dir = args.cache_dir or hub_settings()['cache_dir']
    entries = [_resolve(n) for n in args.names] if args.names else [e for e in load_manifest()
                                                                   if e.published or e.official_source]
    failed = False
    for entry in entries:
        if not entry.published:
            from .official import verify_cached
            try:
                state = verify_cached(entry)
            except WeightsVerificationError as err:
                print(f'{entry.name}: FAILED: {err}')
                failed = True
                continue
            print(f'{entry.name}: {"ok (official source, verified against its lock)" if state else "not cached"}')
            failed |= bool(args.names) and state is None
            continue
        path = _cached_path(entry, cache_dir)
        if path is None:
            print(f'{entry.name}: not cached in {cache_dir}')
            failed |= bool(args.names)  # asked for by name: missing is a failure
            continue
        try:
            verify_file(path, entry.sha256, entry.size, name=entry.name)
            print(f'{entry.name}: ok ({path})')
        except WeightsVerificationError as err:
            print(f'{entry.name}: FAILED: {err}')
            failed = True
    return 1 if failed else 0


def cmd_bundle(args: argparse.Namespace) -> int:
    import timm

    from ._card import hub_config, model_card
    entry = _resolve(args.name)
    out = Path(args.out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise SystemExit(f'{out} exists and is not a folder: choose a new folder (nothing was written)')
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f'{out} exists and is not empty: choose a new folder (nothing was written)')
    source = fetch_weights(entry, cache_dir=args.cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out / entry.filename)
    verify_file(out / entry.filename, entry.sha256, entry.size, name=entry.name)
    model = timm.create_model(entry.model, pretrained=False, pretrained_cfg=entry.tag)
    config = hub_config(entry, model.pretrained_cfg, model.num_features)
    (out / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    (out / 'README.md').write_text(model_card(entry))
    (out / 'hubconf.py').write_text(_BUNDLE_HUBCONF.format(name=entry.name, arch=entry.model))
    print(f'{entry.name}: bundled into {out} (load with timm.create_model("local-dir:{out}", pretrained=True) '
          f'or torch.hub.load("{out}", "model", source="local"))')
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m an_zoo', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('list', help='manifest weights, published and cached state')
    p.add_argument('--cache-dir', help='Hugging Face cache (default: HF_HUB_CACHE / HF_HOME)')
    p.set_defaults(fn=cmd_list)
    p = sub.add_parser('download', help='download and verify weights into the Hugging Face cache')
    p.add_argument('names', nargs='*', help='arch.tag or arch')
    p.add_argument('--all', action='store_true', help='every published weight')
    p.add_argument('--cache-dir', help='Hugging Face cache (default: HF_HUB_CACHE / HF_HOME)')
    p.add_argument('--accept-license', action='store_true',
                   help='accept the licence of official weights that are not on the Hub (remembered)')
    p.add_argument('--from', dest='source', help='an official archive / checkpoint / folder you have (no download)')
    p.set_defaults(fn=cmd_download)
    p = sub.add_parser('import-official', help='maintainers: official file -> Hub-ready folder + manifest hashes')
    p.add_argument('name', help='arch.tag')
    p.add_argument('--from', dest='source', help='official archive / checkpoint / folder (default: download it)')
    p.add_argument('--out', default='converted', help='output folder (default: ./converted/<arch.tag>)')
    p.add_argument('--accept-license', action='store_true', help='accept the official weights\' licence')
    p.set_defaults(fn=cmd_import_official)
    p = sub.add_parser('verify', help='re-hash cached weights against the manifest')
    p.add_argument('names', nargs='*', help='arch.tag or arch (default: every published weight)')
    p.add_argument('--cache-dir', help='Hugging Face cache (default: HF_HUB_CACHE / HF_HOME)')
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser('bundle', help='write a relocatable folder that loads offline')
    p.add_argument('name', help='arch.tag or arch')
    p.add_argument('out', help='new (or empty) folder')
    p.add_argument('--cache-dir', help='Hugging Face cache (default: HF_HUB_CACHE / HF_HOME)')
    p.set_defaults(fn=cmd_bundle)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (WeightsUnavailableError, WeightsVerificationError, PermissionError, ValueError, FileNotFoundError,
            FileExistsError, RuntimeError, ImportError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())

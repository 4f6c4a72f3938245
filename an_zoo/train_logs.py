"""Per-epoch logs of an ``an_zoo.train`` run: ``log.json`` (every epoch), ``summary.csv`` (timm's format) and a
``curves.png`` plot of loss and accuracy."""
import json
from pathlib import Path
from typing import Any, Dict, List

from timm.utils import update_summary

from ._io import atomic_write, atomic_write_text

__all__ = ['write_logs', 'plot_curves']


def write_logs(out_dir: Path, history: List[Dict[str, Any]]) -> None:
    """``log.json``, ``summary.csv`` and ``curves.png`` (if matplotlib is installed) of ``history``, each replaced
    atomically."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / 'log.json', json.dumps(history, indent=1))

    def write_csv(path: str) -> None:
        for row in history:
            update_summary(row['epoch'], row['train'], row['eval'], path, lr=row['lr'], write_header=row is history[0])

    atomic_write(out_dir / 'summary.csv', write_csv)
    plot_curves(out_dir / 'curves.png', history)


def plot_curves(path: Path, history: List[Dict[str, Any]]) -> bool:
    """Train / held-out loss and held-out top-1 per epoch as a PNG; False (nothing written) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = [row['epoch'] + 1 for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row['train']['loss'] for row in history], 'o-', label='train loss')
    ax_loss.plot(epochs, [row['eval']['loss'] for row in history], 'o-', label='held-out loss')
    ax_acc.plot(epochs, [row['eval']['top1'] for row in history], 'o-', label='held-out top-1')
    if all('ema_top1' in row['eval'] for row in history):
        ax_acc.plot(epochs, [row['eval']['ema_top1'] for row in history], 'o-', label='EMA top-1')
    for ax, label in ((ax_loss, 'loss'), (ax_acc, 'top-1 (%)')):
        ax.set_xlabel('epoch')
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(history[-1].get('title', '') if history else '')
    fig.tight_layout()
    try:
        atomic_write(path, lambda p: fig.savefig(p, dpi=100, format='png'))
    finally:
        plt.close(fig)
    return True

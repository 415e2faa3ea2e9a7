"""What an export format is to the exporter: a :class:`Target`.

A target lowers the graphs to its files, applies its part of the quantization plan (in eager torch for
the reference, and before or after lowering for the files), checks its files against the reference,
and names the backend (:mod:`hartkit.backends`) that runs them. ``export_checkpoint`` calls every
target the same way; nothing outside the registry (:mod:`hartkit.export.targets`) asks which format
it holds.

Imports without torch: a target imports its libraries in the methods that use them, so the
registry can be listed (``hartkit --help``) anywhere.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

from hartkit.errors import MissingDependencyError

if TYPE_CHECKING:
    from hartkit.backends import Backend
    from hartkit.export.parity import GraphParity
    from hartkit.export.quantization import FormatPlan
    from hartkit.model.graphs import GraphSpec

Recorded = Mapping[str, list[tuple[dict, list[Any]]]]  # graph -> [(feeds, outputs)] from the reference loop


@dataclass
class Exported:
    """What :meth:`Target.export` wrote."""

    files: dict[str, str]  # graph -> file (or package folder) relative to the bundle
    info: dict[str, Any] = field(default_factory=dict)  # top-level manifest sections of this format
    notes: list[str] = field(default_factory=list)


@dataclass
class Checked:
    """What :meth:`Target.check` found."""

    parity: list["GraphParity"]
    notes: list[str] = field(default_factory=list)


class Target(ABC):
    """One export format. Subclasses set the class attributes and implement :meth:`export`."""

    name: ClassVar[str]  # the format: ``--format`` value, the manifest's ``files`` key, quantize's support column
    libraries: ClassVar[tuple[str, ...]]  # modules the export needs
    extra: ClassVar[str]  # the pip extra that installs them
    backend: ClassVar[str]  # the hartkit.backends runner that reads its files

    # ------------------------------------------------------------------ libraries and backend
    def missing_libraries(self) -> list[str]:
        return [m for m in self.libraries if importlib.util.find_spec(m) is None]

    def require(self) -> None:
        missing = self.missing_libraries()
        if missing:
            raise MissingDependencyError(f"format '{self.name}' needs {', '.join(missing)} (not installed): "
                                         f"pip install 'hartkit[{self.extra}]'")

    def open_backend(self, folder: Path, info: dict) -> "Backend":
        """The runner of this format's files, every graph on its own file (parity checks, verification)."""
        from hartkit.backends import make_backend

        return make_backend(self.backend, folder, info)

    # ------------------------------------------------------------------ quantization
    @abstractmethod
    def quantize_eager(self, model, encoder, plan, ranges: Mapping | None) -> dict:
        """Apply ``plan`` to copies of the models in place, computing as this format computes; -> the
        activation-quantization rules for :class:`hartkit.quantize.fakequant.EmulatedGraph` (may be empty)."""

    def plan_notes(self, plan) -> list[str]:
        """Notes on how this format realizes a resolved plan (what a reader of the bundle should know)."""
        return []

    # ------------------------------------------------------------------ export and check
    @abstractmethod
    def export(self, specs: Sequence["GraphSpec"], modules: Mapping[str, Any], folder: Path, plan: "FormatPlan",
               say: Callable[[str], None]) -> Exported:
        """Write this format's files for every graph under ``folder``, quantized as ``plan`` says
        (``modules``: the fp32 graph wrappers; ``plan.reference()``: the eager-quantized ones)."""

    def check(self, folder: Path, info: dict, recorded: Recorded, output_names: Mapping[str, list[str]],
              plan: "FormatPlan") -> Checked:
        """Every recorded call of every graph on this format's files, against the plan's reference."""
        return Checked(plan.check(self.open_backend(folder, info), info, recorded, output_names))

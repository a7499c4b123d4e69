"""Procedural cardiac MRI phantoms with exactly known attributes.

Why this exists: controllability of a conditional generator ("does a volume
generated for LV volume 150 mL really hold 150 mL?") can only be scored
exactly on data whose ground truth is known. This package draws synthetic
short-axis (SAX) cine-like volumes whose attributes are true by construction,
and a classical (learning-free) `measure` that recovers them from any volume,
real, phantom or generated.

Modules, one concern each:
  anatomy      the heart model: domains (`DomainParams`), per-subject draws,
               the solved ED/ES geometry, its fit and pose in the field of
               view, and the attribute row (`ATTRIBUTES`) computed from it
  rendering    volume synthesis: supersampled partial-volume class fractions,
               intensities, texture, bias field, Rician noise; `generate`
  files        `write_dataset`: NIfTI volumes and labels, attributes.csv,
               phantoms.json (atomic, byte-identical reruns)
  measurement  `measure`: classical segmentation of any SAX-like volume

Domains: a controlled shift between a "public" multi-centre, pathological
cohort (ACDC/M&Ms-like) and a "private" healthy-ish population cohort
(UK-Biobank-like); every number lives in one frozen `DomainParams` per domain
(see `DOMAIN_PARAMS`), written to phantoms.json by `write_dataset`.

Every public name lives here too, so `from jaxldm.data import phantoms;
phantoms.generate(...)` is the way to use the package.
"""

from __future__ import annotations

from jaxldm.data.phantoms import anatomy, files, measurement, rendering
from jaxldm.data.phantoms.anatomy import ATTRIBUTES, DOMAIN_PARAMS, DOMAINS, PHASES, DomainParams
from jaxldm.data.phantoms.files import subject_id, write_dataset
from jaxldm.data.phantoms.measurement import MEASURED, measure
from jaxldm.data.phantoms.rendering import LABELS, generate

__all__ = ["ATTRIBUTES", "DOMAINS", "DOMAIN_PARAMS", "DomainParams", "LABELS", "MEASURED", "PHASES", "anatomy",
           "files", "generate", "measure", "measurement", "rendering", "subject_id", "write_dataset"]

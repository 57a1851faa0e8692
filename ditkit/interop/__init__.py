"""Moving models in and out of ditkit: diffusers' DiTTransformer2DModel (both ways)."""

from .diffusers import (DIFFUSERS_CLASS, check_exportable, diffusers_config, export_diffusers, from_diffusers,
                        import_diffusers, to_diffusers)

__all__ = ["DIFFUSERS_CLASS", "check_exportable", "diffusers_config", "export_diffusers", "from_diffusers",
           "import_diffusers", "to_diffusers"]

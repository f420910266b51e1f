from pipeline.config.load import dump_recipe, load_recipe
from pipeline.config.schema import Recipe

__all__ = ["Recipe", "load_recipe", "dump_recipe"]

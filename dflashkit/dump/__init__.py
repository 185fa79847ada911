"""Stage 2: hidden-state dumps. The reader side (`format`) imports only torch; backends load lazily."""
from ..model.layers import default_target_layer_ids  # noqa: F401
from .format import (  # noqa: F401  (the trainer's import surface)
    DumpFormatError,
    list_dump_records,
    load_dump_record,
    read_meta,
    validate_dump_record,
)


def main(argv: list[str] | None = None) -> int:
    from .run import main as run_main

    return run_main(argv)

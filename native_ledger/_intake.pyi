from collections.abc import Buffer, Callable
from typing import Final, final

RECORD_SIZE: Final = 24
MAX_AMOUNT_CENTS: Final = 100_000_000

@final
class PaymentRoute:
    def __new__(
        cls,
        library: str,
        app: int,
        ssl: bool,
        pattern: str,
        mqd: int,
        on_body: Callable[[bytes], tuple[int, bytes]],
        max_body: int,
        too_large: bytes,
        queue_full: bytes,
        *,
        shared_counts: Buffer | None = None,
        accepted_index: int = 0,
        full_index: int = 0,
        too_large_index: int = 0,
    ) -> PaymentRoute: ...
    def counts(self) -> dict[str, int]: ...

def parse(body: Buffer, /) -> bytes | None: ...
def resolve(library: str, /) -> dict[str, int]: ...

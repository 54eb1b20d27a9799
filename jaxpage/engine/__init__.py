"""Host side of the engine: requests, pages, scheduling. Imports stdlib and numpy only."""

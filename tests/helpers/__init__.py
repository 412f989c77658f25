"""What the test modules share: config builders (``configs``), paths to the real data and synthetic data
(``data``), Ray clusters (``ray``), process-group ranks (``ddp``), brute-force oracles used by more than one module
(``oracles``) and the headless browser (``chromium``). Fixtures live in ``tests/conftest.py``; test modules import
from here, never from ``conftest`` or from one another."""

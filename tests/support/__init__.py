"""What the tests share: databases, servers, simulator helpers."""

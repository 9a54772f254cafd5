"""`make bench`: the router against a direct call and a bare aiohttp proxy, on loopback."""

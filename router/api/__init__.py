"""The HTTP front: the OpenAI endpoints (`openai`), the router's own (`admin`, `dashboard`),
API keys (`auth`), rate limits (`limits`) and what every request passes first (`middleware`:
its id, the header guard, JSON errors)."""

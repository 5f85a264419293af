#!/usr/bin/env bash
# ssrl over plain HTTP: chat, streamed chat, GET /v1/search and POST /retrieve.
# Reads SSRL_BASE_URL (default http://127.0.0.1:8000), SSRL_API_KEY (needed when the server
# runs with --api-key) and SSRL_MODEL (default: the embedded model's name).
set -euo pipefail

BASE="${SSRL_BASE_URL:-http://127.0.0.1:8000}"
BASE="${BASE%/}"; BASE="${BASE%/v1}"
MODEL="${SSRL_MODEL:-smollm2-135m-instruct}"
AUTH=(-H "Authorization: Bearer ${SSRL_API_KEY:-unused}")

echo "== chat (the trace is choices[0].self_search)"
curl -sS --fail-with-body "$BASE/v1/chat/completions" "${AUTH[@]}" \
  -H "Content-Type: application/json" \
  -d '{"model": "'"$MODEL"'",
       "messages": [{"role": "user", "content": "Who painted the Mona Lisa?"}],
       "temperature": 0,
       "self_search": {"policy": "always", "max_turns": 1, "docs_per_search": 2}}'
echo

echo "== stream (reasoning deltas, one search event, answer deltas, the trace, usage)"
curl -sS -N --fail-with-body "$BASE/v1/chat/completions" "${AUTH[@]}" \
  -H "Content-Type: application/json" \
  -d '{"model": "'"$MODEL"'",
       "messages": [{"role": "user", "content": "Who painted the Mona Lisa?"}],
       "temperature": 0, "stream": true, "stream_options": {"include_usage": true},
       "self_search": {"policy": "never", "max_turns": 1}}'

echo "== search"
curl -sS --fail-with-body -G "$BASE/v1/search" "${AUTH[@]}" \
  --data-urlencode "q=Mona Lisa" --data-urlencode "k=2"
echo

echo "== retrieve (Search-R1's retriever API)"
curl -sS --fail-with-body "$BASE/retrieve" "${AUTH[@]}" \
  -H "Content-Type: application/json" \
  -d '{"queries": ["Mona Lisa", "capital of France"], "topk": 2, "return_scores": true}'
echo

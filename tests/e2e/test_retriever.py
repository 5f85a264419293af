"""The server as a retriever: Search-R1's `POST /retrieve` and `GET /v1/search`."""

from __future__ import annotations


def test_retrieve_speaks_search_r1(http, auth_headers):
    body = {"queries": ["Mona Lisa painting", "capital of France"], "topk": 2, "return_scores": True}
    response = http.post("/retrieve", json=body, headers=auth_headers)
    assert response.status_code == 200, response.text
    result = response.json()["result"]
    assert len(result) == 2
    for hits in result:
        assert len(hits) == 2
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True)
        for hit in hits:
            title, _, text = hit["document"]["contents"].partition("\n")
            assert title and text and hit["document"]["id"]
    assert "Mona Lisa" in result[0][0]["document"]["contents"].split("\n")[0]


def test_retrieve_without_scores_lists_documents(http, auth_headers):
    response = http.post("/retrieve", json={"queries": ["Mona Lisa"]}, headers=auth_headers)
    assert response.status_code == 200, response.text
    hits = response.json()["result"][0]
    assert len(hits) == 3  # Search-R1's default topk
    assert set(hits[0]) == {"id", "contents"}


def test_retrieve_needs_the_key_and_a_valid_body(http, auth_headers):
    assert http.post("/retrieve", json={"queries": ["x"]}).status_code == 401
    bad = http.post("/retrieve", json={"queries": []}, headers=auth_headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "queries"


def test_search_endpoint(http, auth_headers):
    response = http.get("/v1/search", params={"q": "Mona Lisa", "k": 2}, headers=auth_headers)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["object"] == "search.result" and payload["backend"] == "local"
    assert len(payload["data"]) == 2
    assert payload["data"][0]["title"] == "Mona Lisa"
    assert payload["data"][0]["url"] == "https://en.wikipedia.org/wiki/Mona_Lisa"
    empty = http.get("/v1/search", params={"q": "  "}, headers=auth_headers)
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "q"
    too_many = http.get("/v1/search", params={"q": "x", "k": 500}, headers=auth_headers)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "k"

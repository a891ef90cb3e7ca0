"""JSON schemas for tests and benchmarks of structured outputs (grammar-constrained decoding).

Each ``NamedSchema`` is a schema an application could ask a model for (a person, an order with
line items, a calendar event, a tool call's arguments...) plus one valid instance of it. Between
them they cover flat and nested (2-3 levels) objects, arrays with ``minItems``/``maxItems``,
enums, ``const``, ``pattern`` strings, integers and numbers with ``minimum``/``maximum``/
``exclusiveMinimum``, booleans, nulls and nullable types (``["string", "null"]``), optional
properties (not in ``required``), ``anyOf``, ``$defs`` + ``$ref``, the string format ``date``
and ``additionalProperties: false`` (on every object, so engines that default to strict and
lenient objects constrain alike).

Bounded on purpose so that a small model can finish: every free-text string has a
``maxLength`` (<= 40), every array a ``maxItems`` (<= 5); a ``pattern`` or ``format`` string is
bounded by its pattern instead (xgrammar ignores ``maxLength`` next to a ``pattern``). Each
example lists its keys in the schema's property order (the order a grammar emits them in) and
is valid under ``jsonschema``; its compact serialization
(``json.dumps(example, separators=(",", ":"))``) is what a constrained model would write.
Everything is plain data; ``_str`` and ``_obj`` only spell the common shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class NamedSchema:
    """A JSON schema, the name it goes by in reports, and one valid instance of it."""

    name: str
    schema: dict[str, Any]
    example: Any


_DATE = {"type": "string", "format": "date"}
_HHMM = {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"}


def _str(max_length: int = 40) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length}


def _obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """A closed object; every property is required unless ``required`` names fewer."""
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required,
            "additionalProperties": False}


SCHEMAS: list[NamedSchema] = [
    NamedSchema(
        "person",
        _obj({"name": _str(), "age": {"type": "integer", "minimum": 0, "maximum": 130},
              "is_student": {"type": "boolean"}}),
        {"name": "Ada Lovelace", "age": 36, "is_student": False},
    ),
    NamedSchema(
        "address",
        _obj({"street": _str(), "city": _str(30),
              "postal_code": {"type": "string", "pattern": "^[0-9]{5}$"},
              "country": {"type": "string", "enum": ["US", "CA", "GB", "DE", "FR"]}}),
        {"street": "221B Baker Street", "city": "London", "postal_code": "10115", "country": "GB"},
    ),
    NamedSchema(
        "contact_card",
        _obj({"person": _obj({"first_name": _str(20), "last_name": _str(20),
                              "phone": {"type": "string", "pattern": "^\\+[0-9]{7,12}$"}}),
              "address": _obj({"city": _str(30),
                               "country": {"type": "string", "enum": ["US", "CA", "GB"]}}),
              "favorite": {"type": "boolean"}}),
        {"person": {"first_name": "Grace", "last_name": "Hopper", "phone": "+15551234567"},
         "address": {"city": "Arlington", "country": "US"}, "favorite": True},
    ),
    NamedSchema(
        "order",
        _obj({"order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
              "customer": _obj({"name": _str(), "email": _str()}, required=["name"]),
              "items": {"type": "array", "minItems": 1, "maxItems": 5, "items": _obj({
                  "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                  "quantity": {"type": "integer", "minimum": 1, "maximum": 10},
                  "unit_price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000}})},
              "total": {"type": "number", "minimum": 0}}),
        {"order_id": "ORD-004217", "customer": {"name": "Jane Doe"},
         "items": [{"sku": "ABC-12", "quantity": 2, "unit_price": 9.99},
                   {"sku": "XYZ-07", "quantity": 1, "unit_price": 24.5}],
         "total": 44.48},
    ),
    NamedSchema(
        "weather_report",
        _obj({"city": _str(30),
              "temperature_c": {"type": "number", "minimum": -90, "maximum": 60},
              "condition": {"type": "string",
                            "enum": ["sunny", "cloudy", "rain", "snow", "fog", "storm"]},
              "humidity": {"type": "integer", "minimum": 0, "maximum": 100},
              "wind": _obj({"speed_kmh": {"type": "number", "minimum": 0, "maximum": 400},
                            "direction": {"type": "string",
                                          "enum": ["N", "NE", "E", "SE", "S", "SW", "W", "NW"]}})}),
        {"city": "Oslo", "temperature_c": -3.5, "condition": "snow", "humidity": 81,
         "wind": {"speed_kmh": 14.2, "direction": "NW"}},
    ),
    NamedSchema(
        "tool_call_search",
        _obj({"name": {"const": "web_search"},
              "arguments": _obj({"query": _str(),
                                 "max_results": {"type": "integer", "minimum": 1, "maximum": 10},
                                 "safe_search": {"type": "boolean"}},
                                required=["query", "safe_search"])}),
        {"name": "web_search", "arguments": {"query": "best hiking trails near Denver",
                                             "max_results": 5, "safe_search": True}},
    ),
    NamedSchema(
        "tool_call_weather",
        _obj({"tool": {"const": "get_weather"},
              "arguments": _obj({"location": _str(),
                                 "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}})}),
        {"tool": "get_weather", "arguments": {"location": "Paris, France", "unit": "celsius"}},
    ),
    NamedSchema(
        "calendar_event",
        _obj({"title": _str(), "date": _DATE, "start_time": _HHMM,
              "duration_minutes": {"type": "integer", "minimum": 5, "maximum": 480},
              "attendees": {"type": "array", "maxItems": 5, "items": _str()},
              "location": {"type": ["string", "null"], "maxLength": 40}}),
        {"title": "Quarterly planning", "date": "2025-03-14", "start_time": "09:30",
         "duration_minutes": 90, "attendees": ["ana@example.com", "bo@example.com"],
         "location": None},
    ),
    NamedSchema(
        "product_review",
        _obj({"product_id": _str(20), "rating": {"type": "integer", "minimum": 1, "maximum": 5},
              "title": _str(), "body": _str(), "recommend": {"type": "boolean"},
              "pros": {"type": "array", "maxItems": 3, "items": _str(30)}},
             required=["product_id", "rating", "title", "body", "recommend"]),
        {"product_id": "B07XJ8C8F5", "rating": 4, "title": "Solid kettle",
         "body": "Boils fast and the lid never sticks.", "recommend": True,
         "pros": ["fast", "quiet"]},
    ),
    NamedSchema(
        "sentiment",
        _obj({"label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
              "confidence": {"type": "number", "minimum": 0, "maximum": 1}}),
        {"label": "positive", "confidence": 0.93},
    ),
    NamedSchema(
        "yes_no_answer",
        _obj({"answer": {"type": "string", "enum": ["yes", "no"]}, "reason": _str()}),
        {"answer": "no", "reason": "The store closes at 6 pm."},
    ),
    NamedSchema(
        "multi_label",
        _obj({"labels": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "string", "enum": ["billing", "bug", "feature", "account", "other"]}}}),
        {"labels": ["billing", "account"]},
    ),
    NamedSchema(
        "entities",
        _obj({"entities": {"type": "array", "maxItems": 5, "items": _obj({
            "text": _str(30),
            "type": {"type": "string", "enum": ["PERSON", "ORG", "LOC", "DATE"]}})}}),
        {"entities": [{"text": "Marie Curie", "type": "PERSON"}, {"text": "Paris", "type": "LOC"},
                      {"text": "1903", "type": "DATE"}]},
    ),
    NamedSchema(
        "flight_booking",
        _obj({"origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
              "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
              "depart_date": _DATE,
              "return_date": {"anyOf": [_DATE, {"type": "null"}]},
              "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
              "cabin": {"type": "string", "enum": ["economy", "premium", "business", "first"]}}),
        {"origin": "SFO", "destination": "NRT", "depart_date": "2025-07-01",
         "return_date": None, "passengers": 2, "cabin": "economy"},
    ),
    NamedSchema(
        "shape",
        _obj({"shape": {"anyOf": [
            _obj({"kind": {"const": "circle"},
                  "radius": {"type": "number", "exclusiveMinimum": 0, "maximum": 100}}),
            _obj({"kind": {"const": "rectangle"},
                  "width": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
                  "height": {"type": "number", "exclusiveMinimum": 0, "maximum": 100}})]},
            "color": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}),
        {"shape": {"kind": "rectangle", "width": 3, "height": 4.5}, "color": "#1a2b3c"},
    ),
    NamedSchema(
        "org_chart",
        {"$defs": {"employee": _obj({"name": _str(30), "title": _str(30),
                                     "level": {"type": "integer", "minimum": 1, "maximum": 9}})},
         **_obj({"team": _str(30), "manager": {"$ref": "#/$defs/employee"},
                 "reports": {"type": "array", "maxItems": 4,
                             "items": {"$ref": "#/$defs/employee"}}})},
        {"team": "Compilers", "manager": {"name": "Kim Lee", "title": "Manager", "level": 6},
         "reports": [{"name": "Sam Roy", "title": "Engineer", "level": 3}]},
    ),
    NamedSchema(
        "recipe",
        _obj({"name": _str(), "servings": {"type": "integer", "minimum": 1, "maximum": 12},
              "ingredients": {"type": "array", "minItems": 1, "maxItems": 5, "items": _obj({
                  "item": _str(20), "amount": {"type": "number", "exclusiveMinimum": 0},
                  "unit": {"type": "string", "enum": ["g", "ml", "tsp", "tbsp", "cup", "pcs"]}})},
              "steps": {"type": "array", "minItems": 1, "maxItems": 5, "items": _str()},
              "vegetarian": {"type": "boolean"}}),
        {"name": "Pancakes", "servings": 4,
         "ingredients": [{"item": "flour", "amount": 200, "unit": "g"},
                         {"item": "milk", "amount": 300, "unit": "ml"},
                         {"item": "eggs", "amount": 2, "unit": "pcs"}],
         "steps": ["Whisk everything together.", "Fry in a hot pan."], "vegetarian": True},
    ),
    NamedSchema(
        "bank_transaction",
        _obj({"id": {"type": "string", "pattern": "^TX[0-9]{8}$"},
              "amount": {"type": "number", "minimum": -100000, "maximum": 100000},
              "currency": {"type": "string", "enum": ["USD", "EUR", "GBP", "JPY"]},
              "direction": {"type": "string", "enum": ["debit", "credit"]},
              "booked_on": _DATE,
              "memo": {"type": ["string", "null"], "maxLength": 40}}),
        {"id": "TX20250314", "amount": -42.17, "currency": "EUR", "direction": "debit",
         "booked_on": "2025-03-14", "memo": "Groceries"},
    ),
    NamedSchema(
        "user_settings",
        _obj({"theme": {"type": "string", "enum": ["light", "dark", "system"]},
              "notifications": _obj({"email": {"type": "boolean"}, "sms": {"type": "boolean"},
                                     "push": {"type": "boolean"}}),
              "language": {"type": "string", "pattern": "^[a-z]{2}(-[A-Z]{2})?$"},
              "timezone": _str(30)},
             required=["theme", "notifications", "language"]),
        {"theme": "dark", "notifications": {"email": True, "sms": False, "push": True},
         "language": "en-US"},
    ),
    NamedSchema(
        "api_error",
        _obj({"error": _obj({"code": {"type": "integer", "minimum": 400, "maximum": 599},
                             "message": _str(), "details": {"type": ["string", "null"],
                                                            "maxLength": 40}}),
              "retryable": {"type": "boolean"}}),
        {"error": {"code": 429, "message": "Too many requests", "details": None},
         "retryable": True},
    ),
    NamedSchema(
        "math_answer",
        _obj({"steps": {"type": "array", "minItems": 1, "maxItems": 5, "items": _str()},
              "answer": {"type": "number"}}),
        {"steps": ["12 * 4 = 48", "48 + 6 = 54"], "answer": 54},
    ),
    NamedSchema(
        "job_posting",
        _obj({"title": _str(), "company": _str(30),
              "location": _obj({"city": _str(30), "remote": {"type": "boolean"}}),
              "salary": _obj({"min": {"type": "integer", "minimum": 0, "maximum": 1000000},
                              "max": {"type": "integer", "minimum": 0, "maximum": 1000000},
                              "currency": {"const": "USD"}}),
              "skills": {"type": "array", "minItems": 1, "maxItems": 5, "items": _str(20)}},
             required=["title", "company", "location", "skills"]),
        {"title": "Backend Engineer", "company": "Acme Corp",
         "location": {"city": "Austin", "remote": True},
         "salary": {"min": 120000, "max": 160000, "currency": "USD"},
         "skills": ["Python", "PostgreSQL", "Kubernetes"]},
    ),
    NamedSchema(
        "place",
        _obj({"name": _str(), "lat": {"type": "number", "minimum": -90, "maximum": 90},
              "lon": {"type": "number", "minimum": -180, "maximum": 180},
              "tags": {"type": "array", "maxItems": 3, "items": _str(20)},
              "rating": {"type": ["number", "null"], "minimum": 0, "maximum": 5}}),
        {"name": "Blue Bottle Coffee", "lat": 37.7825, "lon": -122.4076,
         "tags": ["coffee", "wifi"], "rating": 4.5},
    ),
    NamedSchema(
        "book",
        _obj({"title": _str(),
              "authors": {"type": "array", "minItems": 1, "maxItems": 3, "items": _str(30)},
              "isbn": {"type": "string", "pattern": "^97[89]-[0-9]{10}$"},
              "year": {"type": "integer", "minimum": 1450, "maximum": 2100},
              "genre": {"type": "string",
                        "enum": ["fiction", "mystery", "science", "history", "poetry"]},
              "in_stock": {"type": "boolean"}}),
        {"title": "The Left Hand of Darkness", "authors": ["Ursula K. Le Guin"],
         "isbn": "978-0441478125", "year": 1969, "genre": "fiction", "in_stock": False},
    ),
    NamedSchema(
        "support_ticket",
        _obj({"ticket_id": {"type": "integer", "minimum": 1},
              "priority": {"type": "string", "enum": ["low", "normal", "high", "urgent"]},
              "status": {"const": "open"},
              "customer": _obj({"id": {"type": "integer", "minimum": 1},
                                "tier": {"type": "string", "enum": ["free", "pro", "enterprise"]}}),
              "summary": _str(),
              "tags": {"type": "array", "maxItems": 5, "items": _str(15)}}),
        {"ticket_id": 88412, "priority": "high", "status": "open",
         "customer": {"id": 5521, "tier": "pro"}, "summary": "Cannot export reports to PDF",
         "tags": ["export", "pdf"]},
    ),
    NamedSchema(
        "company_profile",
        _obj({"name": _str(30),
              "headquarters": _obj({
                  "address": _obj({"street": _str(), "city": _str(30),
                                   "country": {"type": "string", "pattern": "^[A-Z]{2}$"}}),
                  "phone": {"type": "string", "pattern": "^\\+[0-9]{7,12}$"}}),
              "employees": {"type": "integer", "minimum": 1, "maximum": 10000000},
              "public": {"type": "boolean"}}),
        {"name": "Globex", "headquarters": {
            "address": {"street": "1 Infinite Loop", "city": "Springfield", "country": "US"},
            "phone": "+18005550199"}, "employees": 1200, "public": False},
    ),
    NamedSchema(
        "payment",
        _obj({"amount": {"type": "number", "exclusiveMinimum": 0, "maximum": 50000},
              "method": {"anyOf": [
                  _obj({"type": {"const": "card"},
                        "last4": {"type": "string", "pattern": "^[0-9]{4}$"},
                        "brand": {"type": "string", "enum": ["visa", "mastercard", "amex"]}}),
                  _obj({"type": {"const": "bank"},
                        "iban": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}[A-Z0-9]{4,20}$"}}),
                  _obj({"type": {"const": "cash"}})]},
              "note": {"type": "null"}}),
        {"amount": 129.0, "method": {"type": "bank", "iban": "DE89370400440532013000"},
         "note": None},
    ),
    NamedSchema(
        "log_entry",
        _obj({"level": {"type": "string", "enum": ["debug", "info", "warning", "error"]},
              "service": {"type": "string", "pattern": "^[a-z][a-z0-9-]{2,19}$"},
              "message": _str(),
              "context": {"anyOf": [_obj({"request_id": _str(20),
                                          "latency_ms": {"type": "integer", "minimum": 0}}),
                                    {"type": "null"}]}}),
        {"level": "error", "service": "checkout-api", "message": "upstream timeout",
         "context": {"request_id": "req-7f3a9c", "latency_ms": 30012}},
    ),
    NamedSchema(
        "poll",
        _obj({"question": _str(),
              "options": {"type": "array", "minItems": 2, "maxItems": 5, "items": _str(20)},
              "multiple_choice": {"type": "boolean"},
              "closes_on": {"type": ["string", "null"], "format": "date"}}),
        {"question": "Where should the offsite be?", "options": ["Lisbon", "Prague", "Remote"],
         "multiple_choice": False, "closes_on": "2025-05-30"},
    ),
]


def slow_schema(variant: int = 0, size: int = 10_000) -> dict[str, Any]:
    """A valid schema that is slow to compile on purpose (about 1 s with llguidance here, 750 KB
    of JSON): an object of ``size`` required strings, each with its own pattern; each
    ``variant`` is another schema (no compile-cache hit). For tests of the compile time limit."""
    props = {f"v{variant}p{i}": {"type": "string", "pattern": f"^[a-z]{{{i % 7 + 1},{i % 13 + 9}}}-[0-9]{{2,{i % 5 + 3}}}$"}
             for i in range(size)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}

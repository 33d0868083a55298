"""Deterministic, realistic Amplitude export records.

Contracts:
- Every record has exactly the 55 keys of ``KEYS`` (the key order of the real
  sample in shared/reference), absent values are None.
- All randomness comes from the ``random.Random`` passed in: the same seed and
  the same calls give byte-identical records (uuids included).
- Timestamps are Amplitude's format, UTC without offset:
  ``"2025-07-01 17:18:45.118000"`` (millisecond precision, so about one in a
  thousand has no fraction at all, as real exports sometimes do).
- ``server_upload_time`` lies inside ``hour``; ``event_time`` is slightly
  before it unless an explicit ``event_lag`` says otherwise (late uploads).
- Web records carry the BROWSER in os_name/os_version and the OS in
  device_family; mobile records carry the OS ("ios"/"android").

Speed matters (a benchmark generates a million records): property sets come
from pools drawn once at import (fixed seeds, immutable tuples) and times
inside the hour are formatted by table lookup.
"""

from __future__ import annotations

import zlib
from datetime import datetime, timedelta, timezone
from random import Random
from typing import Any, Iterator, Sequence

KEYS: tuple[str, ...] = (
    "$insert_id", "$insert_key", "$schema", "adid", "amplitude_attribution_ids",
    "amplitude_event_type", "amplitude_id", "app", "city", "client_event_time",
    "client_upload_time", "country", "data", "data_type", "device_brand",
    "device_carrier", "device_family", "device_id", "device_manufacturer",
    "device_model", "device_type", "dma", "event_id", "event_properties",
    "event_time", "event_type", "global_user_properties", "group_properties",
    "groups", "idfa", "ip_address", "is_attribution_event", "language", "library",
    "location_lat", "location_lng", "os_name", "os_version", "partner_id", "paying",
    "plan", "platform", "processed_time", "region", "sample_rate",
    "server_received_time", "server_upload_time", "session_id", "source_id",
    "start_version", "user_creation_time", "user_id", "user_properties", "uuid",
    "version_name",
)
_KEYSET = frozenset(KEYS)

_MS = timedelta(milliseconds=1)
PROJECT_ID = 636686  # the sample's "app"
PLATFORMS = ("Web", "iOS", "Android")
PAGE_VIEWED = "[Amplitude] Page Viewed"
SESSION_MARKERS = ("session_start", "session_end")

# ---- pools (immutable) -----------------------------------------------------
_LOCATIONS = (
    ("Puchong Batu Dua Belas", "Selangor", "Malaysia"), ("Berlin", "Land Berlin", "Germany"),
    ("Austin", "Texas", "United States"), ("San Francisco", "California", "United States"),
    ("London", "England", "United Kingdom"), ("Paris", "Île-de-France", "France"),
    ("São Paulo", "São Paulo", "Brazil"), ("Bengaluru", "Karnataka", "India"),
    ("Toronto", "Ontario", "Canada"), ("Sydney", "New South Wales", "Australia"),
    ("Warsaw", "Mazovia", "Poland"), ("Tokyo", "Tokyo", "Japan"),
)
_IP_PREFIXES = ("203.0.113.", "198.51.100.", "192.0.2.")  # documentation ranges
_LANGUAGES = ("English", "English", "English", "German", "French", "Spanish", "Portuguese")
_BROWSERS = (("Chrome", "122"), ("Chrome", "124"), ("Safari", "17.4"), ("Firefox", "124"),
             ("Edge", "122"), ("Chrome Mobile", "123"), ("Mobile Safari", "17.4"))
_WEB_OS = ("Mac OS X", "Windows", "Windows", "Linux", "Android", "iOS", "Chrome OS")
_WEB_LIBS = ("amplitude-js/8.21.9", "amplitude-ts/2.11.3", "amplitude-ts/2.7.4")
_IOS = (("18.5", "Apple arm64", None), ("18.5", "Apple iPhone", "iPhone16,1"),
        ("17.6.1", "Apple iPhone", "iPhone15,2"), ("18.3.2", "Apple iPad", "iPad13,18"))
_IOS_LIBS = ("amplitude-swift/1.13.6", "amplitude-flutter/4.3.2_amplitude-swift/1.13.6",
             "amplitude-ios/8.17.2")
_ANDROID = (("14", "samsung", "Samsung Galaxy S23", "SM-S911B"),
            ("15", "Google", "Google Pixel 8", "Pixel 8"),
            ("13", "Xiaomi", "Xiaomi Redmi Note 12", "23021RAA2Y"),
            ("14", "OnePlus", "OnePlus 11", "CPH2449"))
_ANDROID_LIBS = ("amplitude-android-kotlin/1.19.2", "amplitude-android/2.39.8",
                 "amplitude-flutter/4.3.2_amplitude-android-kotlin/1.19.2")
_CARRIERS = ("Unknown", "Unknown", "T-Mobile", "Verizon", "Vodafone", "Maxis")
_VERSIONS = ("1.0.79", "1.0.80", "1.0.81", "1.1.0")

_DOMAINS = ("www.example.com", "app.example.com", "shop.example.org")
_PAGES = (("/", "Home | Example"), ("/pricing", "Pricing | Example"),
          ("/docs/getting-started", "Getting started | Docs"), ("/blog/launch-week", "Launch week"),
          ("/account/settings", "Settings"), ("/cart", "Your cart"), ("/signup", "Sign up"),
          ("/products/widget-pro", "Widget Pro | Shop"))
_REFERRERS = (("https://www.google.com/", "www.google.com"), ("", ""),
              ("https://news.ycombinator.com/", "news.ycombinator.com"),
              ("https://app.example.com/login", "app.example.com"),
              ("https://t.co/", "t.co"))

_WEB_EVENTS = (PAGE_VIEWED, PAGE_VIEWED, PAGE_VIEWED, PAGE_VIEWED, "[Amplitude] Element Clicked",
               "[Amplitude] Element Clicked", "[Amplitude] Form Submitted", "Signed Up",
               "Added To Cart", "Checkout Started", "Search Performed")
_MOBILE_EVENTS = ("Screen: Home", "Screen: Home", "Screen: Property Drops", "Screen: Login",
                  "Viewed Property Drop", "Viewed Hero Section Card", "Property Pre-Order Submitted",
                  "Purchase Completed", "[Amplitude] Application Opened", "session_end")

_UTM_SOURCES = ("google", "newsletter", "twitter", "facebook", "EMPTY", "EMPTY")
_UTM_MEDIUMS = ("cpc", "email", "social", "EMPTY")
_CAMPAIGNS = ("spring_sale", "launch_week", "retargeting_q3", "EMPTY")
_PLANS = ("free", "free", "pro", "team")
_COMPANIES = ("acme", "globex", "initech")


def _draw_value(rng: Random, kind: str, spec: Any) -> Any:
    """One property value (kinds: s=str i=int f=float b=bool)."""
    if kind == "s":
        return _pick(rng, spec)
    if kind == "i":
        return rng.randrange(*spec)
    if kind == "f":
        return round(rng.uniform(*spec), 2)
    return rng.random() < 0.5


def _pick(rng: Random, seq: Sequence[Any]) -> Any:
    # rng.choice costs ~4x more (rejection sampling); the bias here is irrelevant
    return seq[int(rng.random() * len(seq))]


def _int(rng: Random, lo: int, hi: int) -> int:
    """A random int in [lo, hi)."""
    return lo + int(rng.random() * (hi - lo))


def _draw_event_properties(rng: Random, page_view: bool) -> tuple[tuple[str, Any], ...]:
    """5-15 properties; a page view has the page fields plus 0-6 others."""
    props: dict[str, Any] = {}
    if page_view:
        domain = _pick(rng, _DOMAINS)
        path, title = _pick(rng, _PAGES)
        referrer, referring_domain = _pick(rng, _REFERRERS)
        props = {"[Amplitude] Page Domain": domain, "[Amplitude] Page Path": path,
                 "[Amplitude] Page Title": title, "[Amplitude] Page URL": f"https://{domain}{path}",
                 "referrer": referrer, "referring_domain": referring_domain}
    # most events carry few properties, some many: 5-15, skewed low (avg ~8)
    count = int(7 * rng.random() ** 2) if page_view else 5 + int(11 * rng.random() ** 2)
    generic = rng.sample(_GENERIC_PROPS, count)
    for name, kind, spec in generic:
        props[name] = _draw_value(rng, kind, spec)
    return tuple(props.items())


def _draw_user_properties(rng: Random) -> tuple[tuple[str, Any], ...]:
    referrer, referring_domain = _pick(rng, _REFERRERS)
    props: dict[str, Any] = {
        "initial_utm_source": _pick(rng, _UTM_SOURCES),
        "initial_utm_campaign": _pick(rng, _CAMPAIGNS),
        "initial_referrer": referrer or "EMPTY",
        "initial_referring_domain": referring_domain or "EMPTY",
        "plan": _pick(rng, _PLANS),
        "email_verified": rng.random() < 0.7,
        "lifetime_orders": _int(rng, 0, 40),
    }
    if rng.random() < 0.5:
        props["initial_utm_medium"] = _pick(rng, _UTM_MEDIUMS)
    if rng.random() < 0.3:
        props["favorite_city"] = _pick(rng, _LOCATIONS)[0]
    return tuple(props.items())


# Property sets are drawn once (fixed seeds) and picked per record: drawing
# 5-15 values per record was a third of the generator's time.
_GENERIC_PROPS = (
    ("Drop Id", "i", (1, 60)), ("Drop Type", "s", ("Pre-Order", "Buy Anytime", "Auction")),
    ("Price per Share", "f", (5.0, 250.0)), ("Number of Shares", "i", (1, 20)),
    ("Total Price", "f", (5.0, 4000.0)), ("Status", "s", ("buying", "sold out", "open")),
    ("Position in List", "i", (1, 30)), ("Current Screen", "s", ("Property Drops", "Home", "Wallet")),
    ("Property", "s", ("Expired Pre Order", "Marina View", "Old Town Loft", "Harbour 12")),
    ("is_first_purchase", "b", None), ("currency", "s", ("USD", "EUR", "MYR", "GBP")),
    ("button_text", "s", ("Buy now", "Continue", "Learn more", "Sign up")),
    ("search_term", "s", ("loft", "berlin", "2 bedroom", "pre-order")),
    ("results_count", "i", (0, 120)), ("experiment_variant", "s", ("control", "test")),
    ("load_time_ms", "i", (40, 4000)), ("scroll_depth", "f", (0.0, 1.0)),
    ("has_coupon", "b", None), ("cart_items", "i", (1, 9)), ("plan_name", "s", ("free", "pro", "team")),
)
_POOL_SIZE = 512
_EVENT_PROP_POOL = tuple(_draw_event_properties(Random(f"e{i}"), False) for i in range(_POOL_SIZE))
_PAGE_PROP_POOL = tuple(_draw_event_properties(Random(f"p{i}"), True) for i in range(_POOL_SIZE))
_USER_PROP_POOL = tuple(_draw_user_properties(Random(f"u{i}")) for i in range(_POOL_SIZE))

# time formatting tables: "MM:SS" for each second of an hour, ".mmm000" per ms
_MMSS = tuple(f"{m:02d}:{s:02d}" for m in range(60) for s in range(60))
_FRACTION = ("",) + tuple(f".{ms:03d}000" for ms in range(1, 1000))


# ---- small helpers ---------------------------------------------------------
def random_uuid(rng: Random) -> str:
    """A version-4 uuid drawn from ``rng`` (so deterministic per seed)."""
    raw = rng.randbytes(16)
    h = raw.hex()
    # version nibble 4 and RFC 4122 variant (8, 9, a or b), as uuid.uuid4()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[raw[8] & 3]}{h[17:20]}-{h[20:]}"


def format_time(dt: datetime) -> str:
    """Amplitude's export time format (UTC, no offset, space, microseconds if any)."""
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc).replace(tzinfo=None)
    return dt.isoformat(" ")


def epoch_ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def utc_hour(hour: datetime) -> datetime:
    if hour.tzinfo is not timezone.utc:
        if hour.tzinfo is None or hour.utcoffset() is None:
            raise ValueError(f"hour must be timezone-aware UTC: {hour!r}")
        hour = hour.astimezone(timezone.utc)
    if hour.minute or hour.second or hour.microsecond:
        raise ValueError(f"hour must be on the hour: {hour!r}")
    return hour


def _format_offset(hour: datetime, prefix: str, off_ms: int) -> str:
    """``format_time(hour + off_ms)``; table lookups inside the hour.

    ``prefix`` is ``hour`` formatted up to the hour ("2025-07-01 17:").
    """
    if 0 <= off_ms < 3_600_000:
        second, ms = divmod(off_ms, 1000)
        return prefix + _MMSS[second] + _FRACTION[ms]
    return format_time(hour + timedelta(milliseconds=off_ms))


def device_profile(rng: Random, platform: str) -> dict[str, Any]:
    """The per-device fields (OS, browser, library, place) for ``platform``."""
    city, region, country = _pick(rng, _LOCATIONS)
    common = {"city": city, "region": region, "country": country,
              "ip_address": _pick(rng, _IP_PREFIXES) + str(_int(rng, 1, 255)),
              "language": _pick(rng, _LANGUAGES)}
    if platform == "Web":
        browser, version = _pick(rng, _BROWSERS)
        return {**common, "os_name": browser, "os_version": version,
                "device_family": _pick(rng, _WEB_OS), "device_brand": None,
                "device_manufacturer": None, "device_model": None, "device_carrier": None,
                "library": _pick(rng, _WEB_LIBS), "version_name": None, "start_version": None,
                "amplitude_attribution_ids": None}
    version = _pick(rng, _VERSIONS)
    mobile = {"device_carrier": _pick(rng, _CARRIERS), "version_name": version,
              "start_version": _pick(rng, _VERSIONS[: _VERSIONS.index(version) + 1]),
              "amplitude_attribution_ids": ["0" * 32]}
    if platform == "iOS":
        os_version, family, model = _pick(rng, _IOS)
        return {**common, **mobile, "os_name": "ios", "os_version": os_version,
                "device_family": family, "device_brand": None, "device_manufacturer": None,
                "device_model": model, "library": _pick(rng, _IOS_LIBS)}
    if platform == "Android":
        os_version, brand, family, model = _pick(rng, _ANDROID)
        return {**common, **mobile, "os_name": "android", "os_version": os_version,
                "device_family": family, "device_brand": brand, "device_manufacturer": brand,
                "device_model": model, "library": _pick(rng, _ANDROID_LIBS)}
    raise ValueError(f"platform must be one of {PLATFORMS}: {platform!r}")


def user_properties(rng: Random) -> dict[str, Any]:
    """About eight first-touch and state properties, some "EMPTY" (a new dict)."""
    return dict(_pick(rng, _USER_PROP_POOL))


def event_properties(rng: Random, event_type: str) -> dict[str, Any]:
    """5-15 properties (str/int/float/bool) as a new dict.

    Page views carry the ``[Amplitude] Page ...`` fields, ``referrer`` and
    ``referring_domain``; SDK session markers carry none, as in the sample.
    """
    if event_type in SESSION_MARKERS:
        return {}
    return dict(_pick(rng, _PAGE_PROP_POOL if event_type == PAGE_VIEWED else _EVENT_PROP_POOL))


def make_record(rng: Random, *, hour: datetime, user_id: str | None, device_id: str | None,
                platform: str, session_id: int, event_type: str, seq: int,
                event_lag: timedelta | None = None, profile: dict[str, Any] | None = None,
                **overrides: Any) -> dict[str, Any]:
    """One export record uploaded during ``hour`` (tz-aware UTC, on the hour).

    ``seq`` is the device's event counter (``event_id``). ``event_lag`` is
    server_upload_time - event_time (default: 50 ms to 60 s). ``profile``
    (from ``device_profile``) pins per-device fields; ``overrides`` replace
    any of the 55 keys (unknown keys raise KeyError).
    """
    hour = utc_hour(hour)
    prefix = hour.isoformat(" ")[:14]
    rnd = rng.random
    upload = int(rnd() * 3_600_000)  # ms into the hour
    received = _format_offset(hour, prefix, upload - 1 - int(rnd() * 7))
    lag = 50 + int(rnd() * 59_950) if event_lag is None else int(event_lag / _MS)
    event_time = _format_offset(hour, prefix, upload - lag)
    p = profile if profile is not None else device_profile(rng, platform)
    if rnd() < 0.05:
        company = _pick(rng, _COMPANIES)
        groups: dict[str, Any] = {"company": [company]}
        group_props: dict[str, Any] = {"company": {company: {"plan": _pick(rng, _PLANS),
                                                             "seats": _int(rng, 2, 500)}}}
    else:
        groups, group_props = {}, {}
    insert_id = random_uuid(rng)
    rec = {
        "$insert_id": insert_id.upper() if platform == "iOS" else insert_id,
        "$insert_key": None, "$schema": None, "adid": None,
        "amplitude_attribution_ids": p["amplitude_attribution_ids"],
        "amplitude_event_type": None,
        "amplitude_id": None,  # below, unless overridden
        "app": PROJECT_ID, "city": p["city"], "client_event_time": event_time,
        "client_upload_time": received, "country": p["country"],
        "data": {"path": "/2/httpapi", "user_properties_updated": True,
                 "group_first_event": {}, "group_ids": {}},
        "data_type": "event", "device_brand": p["device_brand"],
        "device_carrier": p["device_carrier"], "device_family": p["device_family"],
        "device_id": device_id, "device_manufacturer": p["device_manufacturer"],
        "device_model": p["device_model"], "device_type": None, "dma": None, "event_id": seq,
        "event_properties": event_properties(rng, event_type), "event_time": event_time,
        "event_type": event_type, "global_user_properties": None,
        "group_properties": group_props, "groups": groups, "idfa": None,
        "ip_address": p["ip_address"], "is_attribution_event": None, "language": p["language"],
        "library": p["library"], "location_lat": None, "location_lng": None,
        "os_name": p["os_name"], "os_version": p["os_version"], "partner_id": None,
        "paying": None, "plan": {}, "platform": platform,
        "processed_time": _format_offset(hour, prefix, upload + 300 + int(rnd() * 2700)),
        "region": p["region"], "sample_rate": None, "server_received_time": received,
        "server_upload_time": _format_offset(hour, prefix, upload),
        "session_id": session_id, "source_id": None, "start_version": p["start_version"],
        "user_creation_time": None, "user_id": user_id,
        "user_properties": None,  # below, unless overridden
        "uuid": random_uuid(rng), "version_name": p["version_name"],
    }
    # skip drawing what the caller pins anyway (population users keep theirs)
    if "amplitude_id" not in overrides:
        rec["amplitude_id"] = 1_000_000_000_000 + zlib.crc32((user_id or device_id or "").encode())
    if "user_properties" not in overrides:
        rec["user_properties"] = user_properties(rng)
    for key, value in overrides.items():
        if key not in _KEYSET:
            raise KeyError(f"not an export key: {key!r}")
        rec[key] = value
    return rec


# ---- populations -----------------------------------------------------------
class _User:
    __slots__ = ("user_id", "amplitude_id", "properties")

    def __init__(self, rng: Random):
        self.user_id = random_uuid(rng)
        self.amplitude_id = 1_000_000_000_000 + rng.randrange(10**9)
        self.properties = user_properties(rng)


class _Device:
    """Mutable state of one device inside one make_population call."""

    __slots__ = ("device_id", "platform", "profile", "seq", "anon_left", "session_id",
                 "session_hour", "amplitude_id")

    def __init__(self, rng: Random, platform: str, anon_events: int):
        device_id = random_uuid(rng)
        self.device_id = device_id.upper() if platform == "iOS" else device_id
        self.platform = platform
        self.profile = device_profile(rng, platform)
        self.seq = _int(rng, 1, 300)
        self.anon_left = anon_events  # events before this device logs in
        self.session_id = -1
        self.session_hour: datetime | None = None
        self.amplitude_id = 1_000_000_000_000 + rng.randrange(10**9)


def _pick_platform(rng: Random, web_share: float) -> str:
    if rng.random() < web_share:
        return "Web"
    return "iOS" if rng.random() < 0.5 else "Android"


def make_population(rng: Random, n_events: int, hours: Sequence[datetime], *,
                    n_users: int | None = None, web_share: float = 0.3,
                    anonymous_device_share: float = 0.15, shared_device_share: float = 0.03,
                    late_share: float = 0.01) -> Iterator[dict[str, Any]]:
    """Yield ``n_events`` records spread evenly over ``hours`` (in that order).

    Users own 1-3 devices (``web_share`` web, the rest iOS/Android). A user's
    devices start anonymous for a few events (user_id None) and then log in on
    the same device, so each device id later appears with its user id. Some
    devices never log in; a few are shared by two users (account switches).
    Sessions belong to a device: a new one at most once per hour, the first
    event of a mobile session is ``session_start``. About ``late_share`` of
    the events were uploaded 1-40 hours after they happened.
    """
    if not hours:
        raise ValueError("hours must not be empty")
    n_users = n_users if n_users is not None else max(5, n_events // 40)
    bindings: list[tuple[_Device, _User | None]] = []
    for _ in range(n_users):
        user = _User(rng)
        n_devices = rng.choices((1, 2, 3), (6, 3, 1))[0]
        for i in range(n_devices):
            anon = _pick(rng, (0, 1, 2, 3, 5, 8)) if i == 0 else _int(rng, 0, 3)
            bindings.append((_Device(rng, _pick_platform(rng, web_share), anon), user))
        if bindings and rng.random() < shared_device_share:
            # another user signs in on a device someone else already uses
            other_device = _pick(rng, bindings)[0]
            bindings.append((other_device, user))
    for _ in range(max(1, int(n_users * anonymous_device_share))):
        bindings.append((_Device(rng, _pick_platform(rng, web_share), 1 << 62), None))

    per_hour, extra = divmod(n_events, len(hours))
    for index, hour in enumerate(hours):
        hour_ms = epoch_ms(hour)
        for _ in range(per_hour + (1 if index < extra else 0)):
            device, user = _pick(rng, bindings)
            if device.anon_left > 0 or user is None:
                device.anon_left -= 1
                user_id, amplitude_id = None, device.amplitude_id
            else:
                user_id, amplitude_id = user.user_id, user.amplitude_id
            lag = None
            if rng.random() < late_share:
                lag = timedelta(hours=rng.uniform(1, 40))
                session_id = hour_ms - int(lag.total_seconds() * 1000) - _int(rng, 60_000, 600_000)
                event_type = _pick(rng, _WEB_EVENTS if device.platform == "Web" else _MOBILE_EVENTS)
            else:
                new_session = device.session_hour != hour and (device.session_id < 0 or rng.random() < 0.2)
                if new_session:
                    # starts before the hour by more than the longest normal lag,
                    # so session_id <= event_time holds
                    device.session_id = hour_ms - _int(rng, 60_000, 1_200_000)
                    device.session_hour = hour
                session_id = device.session_id
                if new_session and device.platform != "Web":
                    event_type = "session_start"
                else:
                    event_type = _pick(rng, _WEB_EVENTS if device.platform == "Web" else _MOBILE_EVENTS)
            device.seq += 1
            yield make_record(
                rng, hour=hour, user_id=user_id, device_id=device.device_id,
                platform=device.platform, session_id=session_id, event_type=event_type,
                seq=device.seq, event_lag=lag, profile=device.profile, amplitude_id=amplitude_id,
                # the user's state at the time; a copy, so consumers may mutate it
                user_properties=dict(user.properties) if user else user_properties(rng),
            )

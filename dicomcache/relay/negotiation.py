"""Transfer-syntax negotiation for forwarding: pure functions, no sockets.

The clinic's staff know the behaviour by its names (see docs/relay.md):

* five strategies, each a set of transfer syntaxes the relay is prepared to
  send in, from ``universal`` (Implicit VR Little Endian only) to ``extended``
  (everything, lossy syntaxes included);
* an automatic fallback sequence towards ``universal`` when an association
  yields no usable presentation context, bounded by ``max_association_retries``
  (:func:`fallback_sequence`; the walk along it is :mod:`.fallback`'s);
* the dataset's own syntax proposed first, so nothing is transcoded needlessly.

How proposals are laid out
--------------------------
Every (SOP class, transfer syntax) pair is its own presentation context with a
single transfer syntax.  An acceptor picks one syntax per context, so a
context listing several would let the peer, not us, decide whether we
transcode; one syntax per context tells us exactly what the peer accepts
(which the error messages and the learned state report).  A study holds few
SOP classes, so even ``extended`` (16 syntaxes) fits several classes in
the 128-context limit; :func:`fit_batch` cuts a batch where it would not.

Choosing what to send
---------------------
:func:`rank_targets` orders the syntaxes a dataset may be sent in, cheapest
and most faithful first: its own syntax; the uncompressed syntaxes (same VR
encoding first); lossless compressions we can encode; lossy ones only when
allowed.  :func:`choose` picks the best accepted context in that order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from dicomcache.config import STRATEGIES
from dicomcache.dicom.syntaxes import (
    DEFLATED_LE,
    EXPLICIT_BE,
    EXPLICIT_LE,
    HTJ2K,
    HTJ2K_LOSSLESS,
    HTJ2K_LOSSLESS_RPCL,
    IMPLICIT_LE,
    JPEG_2000,
    JPEG_2000_LOSSLESS,
    JPEG_BASELINE,
    JPEG_EXTENDED,
    JPEG_LOSSLESS,
    JPEG_LOSSLESS_SV1,
    JPEG_LS_LOSSLESS,
    JPEG_LS_NEAR_LOSSLESS,
    LOSSLESS,
    LOSSY,
    RLE_LOSSLESS,
    UNCOMPRESSED,
)

#: Presentation contexts an association may request (PS3.8: odd IDs 1-255).
MAX_CONTEXTS = 128

#: Every syntax the SCP accepts from modalities (all of them pydicom can read).
ACCEPTED_FROM_MODALITIES: tuple[str, ...] = (
    EXPLICIT_LE, IMPLICIT_LE, DEFLATED_LE, EXPLICIT_BE, *LOSSLESS, *LOSSY,
)

#: Storage SOP classes a modality may send that pynetdicom's
#: ``AllStoragePresentationContexts`` lacks (UID → pydicom's keyword), from PS3.6
#: Annex A: the retired ones (old ultrasound, nuclear medicine and angiography
#: systems still send them; DCMTK's storescp and Orthanc store them) and the
#: current ones it leaves out.  Not Storage Commitment, not the DICOMDIR class
#: (no C-STORE).
EXTRA_STORAGE_SOP_CLASSES: Mapping[str, str] = {
    "1.2.840.10008.5.1.1.27": "StoredPrintStorage",
    "1.2.840.10008.5.1.1.29": "HardcopyGrayscaleImageStorage",
    "1.2.840.10008.5.1.1.30": "HardcopyColorImageStorage",
    "1.2.840.10008.5.1.4.1.1.3": "UltrasoundMultiFrameImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.5": "NuclearMedicineImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.6": "UltrasoundImageStorageRetired",
    "1.2.840.10008.5.1.4.1.1.8": "StandaloneOverlayStorage",
    "1.2.840.10008.5.1.4.1.1.9": "StandaloneCurveStorage",
    "1.2.840.10008.5.1.4.1.1.9.1": "WaveformStorageTrial",
    "1.2.840.10008.5.1.4.1.1.10": "StandaloneModalityLUTStorage",
    "1.2.840.10008.5.1.4.1.1.11": "StandaloneVOILUTStorage",
    "1.2.840.10008.5.1.4.1.1.12.3": "XRayAngiographicBiPlaneImageStorage",
    "1.2.840.10008.5.1.4.1.1.77.1": "VLImageStorageTrial",
    "1.2.840.10008.5.1.4.1.1.77.2": "VLMultiFrameImageStorageTrial",
    "1.2.840.10008.5.1.4.1.1.88.1": "TextSRStorageTrial",
    "1.2.840.10008.5.1.4.1.1.88.2": "AudioSRStorageTrial",
    "1.2.840.10008.5.1.4.1.1.88.3": "DetailSRStorageTrial",
    "1.2.840.10008.5.1.4.1.1.88.4": "ComprehensiveSRStorageTrial",
    "1.2.840.10008.5.1.4.1.1.129": "StandalonePETCurveStorage",
    "1.2.840.10008.5.1.4.34.1": "RTBeamsDeliveryInstructionStorageTrial",
    "1.2.840.10008.5.1.4.1.1.501.1": "DICOSCTImageStorage",
    "1.2.840.10008.5.1.4.1.1.501.2.1": "DICOSDigitalXRayImageStorageForPresentation",
    "1.2.840.10008.5.1.4.1.1.501.2.2": "DICOSDigitalXRayImageStorageForProcessing",
    "1.2.840.10008.5.1.4.1.1.501.3": "DICOSThreatDetectionReportStorage",
    "1.2.840.10008.5.1.4.1.1.501.4": "DICOS2DAITStorage",
    "1.2.840.10008.5.1.4.1.1.501.5": "DICOS3DAITStorage",
    "1.2.840.10008.5.1.4.1.1.501.6": "DICOSQuadrupoleResonanceStorage",
    "1.2.840.10008.5.1.4.1.1.601.1": "EddyCurrentImageStorage",
    "1.2.840.10008.5.1.4.1.1.601.2": "EddyCurrentMultiFrameImageStorage",
    # Non-patient objects (pynetdicom serves them with its own storage service).
    "1.2.840.10008.5.1.4.1.1.200.1": "CTDefinedProcedureProtocolStorage",
    "1.2.840.10008.5.1.4.1.1.200.3": "ProtocolApprovalStorage",
    "1.2.840.10008.5.1.4.1.1.200.7": "XADefinedProcedureProtocolStorage",
    "1.2.840.10008.5.1.4.1.1.201.1": "InventoryStorage",
    "1.2.840.10008.5.1.4.38.1": "HangingProtocolStorage",
    "1.2.840.10008.5.1.4.39.1": "ColorPaletteStorage",
    "1.2.840.10008.5.1.4.43.1": "GenericImplantTemplateStorage",
    "1.2.840.10008.5.1.4.44.1": "ImplantAssemblyTemplateStorage",
    "1.2.840.10008.5.1.4.45.1": "ImplantTemplateGroupStorage",
}

_UNIVERSAL = (IMPLICIT_LE,)
_CONSERVATIVE = (*_UNIVERSAL, EXPLICIT_LE)
_STANDARD = (*_CONSERVATIVE, EXPLICIT_BE)
_COMPRESSION = (*_STANDARD, RLE_LOSSLESS, JPEG_2000_LOSSLESS, JPEG_LOSSLESS_SV1, JPEG_LOSSLESS,
                JPEG_LS_LOSSLESS)
_EXTENDED = (*_COMPRESSION, JPEG_BASELINE, JPEG_EXTENDED, JPEG_LS_NEAR_LOSSLESS, JPEG_2000,
             DEFLATED_LE, HTJ2K_LOSSLESS, HTJ2K_LOSSLESS_RPCL, HTJ2K)

#: The transfer syntaxes each strategy may send in.
STRATEGY_SYNTAXES: Mapping[str, tuple[str, ...]] = {
    "universal": _UNIVERSAL,
    "conservative": _CONSERVATIVE,
    "standard": _STANDARD,
    "compression": _COMPRESSION,
    "extended": _EXTENDED,
}


def fallback_sequence(strategy: str, max_association_retries: int) -> tuple[str, ...]:
    """The strategies tried in turn, starting with ``strategy``.

    Each step drops to the next more compatible strategy
    (``standard`` → ``conservative`` → ``universal``); at most
    ``max_association_retries`` associations are made.

    >>> fallback_sequence("standard", 3)
    ('standard', 'conservative', 'universal')
    """
    if strategy not in STRATEGY_SYNTAXES:
        raise ValueError(f"unknown strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if max_association_retries < 1:
        raise ValueError("max_association_retries must be at least 1")
    start = STRATEGIES.index(strategy)
    return tuple(reversed(STRATEGIES[: start + 1]))[:max_association_retries]


def start_strategy(configured: str, learned: str | None) -> str:
    """Where to start: what was learned to work (below the configuration after a
    fallback, above it after a widening), else the configured strategy."""
    if learned is not None and learned in STRATEGY_SYNTAXES:
        return learned
    return configured


def widen_target(current: str, sources: Iterable[Source]) -> str | None:
    """The strategy to widen to when the peer refused every syntax ``current`` proposed
    (result 4): ``compression`` (the lossless syntaxes the relay can produce), or
    ``extended`` when a source's own syntax is only there (or ``current`` is
    ``compression``); ``None`` from ``extended``, the widest."""
    if current == "extended":
        return None
    own_outside = any(s.transfer_syntax not in _COMPRESSION for s in sources)
    if current == "compression" or own_outside:
        return "extended"
    return "compression"


#: Presentation context results (PS3.8 §9.3.3.2, Table 9-18).
ACCEPTANCE, USER_REJECTION, NO_REASON, ABSTRACT_SYNTAX_NOT_SUPPORTED, \
    TRANSFER_SYNTAXES_NOT_SUPPORTED = range(5)
RESULT_NAMES: Mapping[int, str] = {
    USER_REJECTION: "user rejection",
    NO_REASON: "no reason given",
    ABSTRACT_SYNTAX_NOT_SUPPORTED: "abstract syntax (SOP class) not supported",
    TRANSFER_SYNTAXES_NOT_SUPPORTED: "transfer syntaxes not supported",
}


@dataclass(frozen=True, slots=True)
class ContextResult:
    """How the peer answered one proposed presentation context (0: accepted)."""

    abstract_syntax: str
    transfer_syntax: str
    result: int


@dataclass(frozen=True, slots=True)
class Source:
    """What negotiation needs to know about one instance to forward."""

    sop_class: str
    transfer_syntax: str
    #: False for data sets without Pixel Data: their "compressed" encodings are
    #: plain Explicit VR Little Endian, so any syntax is reachable by relabelling.
    has_pixels: bool = True


@dataclass(frozen=True, slots=True)
class Proposal:
    """One requested presentation context (one abstract syntax, one transfer syntax)."""

    abstract_syntax: str
    transfer_syntax: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """One presentation context the peer accepted."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass(frozen=True, slots=True)
class Choice:
    """How to send one instance: which accepted context, and whether to transcode."""

    context_id: int
    transfer_syntax: str
    transcode: bool
    #: The pixel data is re-compressed with a lossy syntax (``extended`` + allowed only).
    lossy_recompression: bool


def _targets_for(strategy: str, encodable: Iterable[str], allow_lossy: bool) -> list[str]:
    """Syntaxes we can produce from any source under ``strategy`` (not own syntax)."""
    can = set(encodable)
    allowed = STRATEGY_SYNTAXES[strategy]
    out = [ts for ts in UNCOMPRESSED if ts in allowed]
    out += [ts for ts in LOSSLESS if ts in allowed and ts in can]
    if allow_lossy and strategy == "extended":
        out += [ts for ts in LOSSY if ts in allowed and ts in can]
    return out


def propose(
    strategy: str,
    sources: Iterable[Source],
    *,
    encodable: Iterable[str] = (),
    allow_lossy: bool = False,
    probe: bool = False,
) -> list[Proposal]:
    """The presentation contexts to request for ``sources`` under ``strategy``.

    Per SOP class, in order of first appearance: each source's own syntax the
    strategy allows (first, so it is used untouched when accepted), then the
    syntaxes we could transcode to.  Duplicates are dropped.  The result may
    exceed :data:`MAX_CONTEXTS`; see :func:`fit_batch`.

    ``probe`` (a widened association, after the peer refused every syntax it was
    offered): every other syntax of ``extended`` too, last, so that the peer's
    answer says what it accepts (the quarantine reason lists it) even where the
    relay may not produce it; :func:`choose` never picks one it may not send.
    """
    allowed = STRATEGY_SYNTAXES[strategy]
    targets = _targets_for(strategy, encodable, allow_lossy)
    if probe:
        targets += [ts for ts in _EXTENDED if ts not in targets]
    own: dict[str, list[str]] = {}
    for src in sources:
        syntaxes = own.setdefault(src.sop_class, [])
        if src.transfer_syntax in allowed and src.transfer_syntax not in syntaxes:
            syntaxes.append(src.transfer_syntax)
    out: list[Proposal] = []
    for sop_class, syntaxes in own.items():
        for ts in [*syntaxes, *(t for t in targets if t not in syntaxes)]:
            out.append(Proposal(sop_class, ts))
    return out


def fit_batch(
    strategy: str,
    sources: Sequence[Source],
    *,
    encodable: Iterable[str] = (),
    allow_lossy: bool = False,
    limit: int = MAX_CONTEXTS,
    probe: bool = False,
) -> int:
    """How many of ``sources`` (a prefix, to keep arrival order) fit in one association.

    Counts exactly what :func:`propose` would request.  Always at least 1
    when ``sources`` is not empty: one SOP class never needs more contexts
    than there are syntaxes (< 128).
    """
    allowed = STRATEGY_SYNTAXES[strategy]
    targets = set(_targets_for(strategy, encodable, allow_lossy))
    if probe:
        targets |= set(_EXTENDED)
    own: dict[str, set[str]] = {}
    total = 0
    for n, src in enumerate(sources):
        syntaxes = own.get(src.sop_class)
        extra = 0
        if syntaxes is None:
            syntaxes = own[src.sop_class] = set()
            extra = len(targets)
        if src.transfer_syntax in allowed and src.transfer_syntax not in syntaxes \
                and src.transfer_syntax not in targets:
            extra += 1
        if total + extra > limit:
            return max(n, 1)
        if src.transfer_syntax in allowed:
            syntaxes.add(src.transfer_syntax)
        total += extra
    return len(sources)


def rank_targets(
    source: Source,
    *,
    encodable: Iterable[str] = (),
    allow_lossy: bool = False,
) -> list[str]:
    """Syntaxes ``source`` may be sent in, best first (own syntax, then cheapest).

    * own syntax: sent as received;
    * uncompressed: same VR encoding first (Explicit ↔ Implicit is cheap, Big
      Endian last); for compressed sources this is decompression;
    * lossless compressions we can encode (RLE, JPEG-LS, JPEG Lossless, JPEG
      2000): a lossy source decompressed and re-encoded losslessly loses
      nothing more;
    * lossy compressions we can encode, only when ``allow_lossy``.

    A data set without Pixel Data can be sent in any syntax (its encoding is
    the same for every compressed syntax).
    """
    can = set(encodable)
    own = source.transfer_syntax
    if own == IMPLICIT_LE:
        native = [IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE]
    elif own == EXPLICIT_BE:
        native = [EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE]
    else:
        native = [EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE]
    if source.has_pixels:
        lossless = [ts for ts in LOSSLESS if ts in can]
        lossy = [ts for ts in LOSSY if ts in can] if allow_lossy else []
    else:
        lossless = list(LOSSLESS)
        lossy = list(LOSSY)
    out = [own]
    for ts in (*native, *lossless, *lossy):
        if ts not in out:
            out.append(ts)
    if not source.has_pixels and DEFLATED_LE not in out:
        out.append(DEFLATED_LE)
    return out


def choose(
    source: Source,
    accepted: Iterable[Accepted],
    *,
    encodable: Iterable[str] = (),
    allow_lossy: bool = False,
) -> Choice | None:
    """The best accepted context for ``source``, or ``None`` if none is usable."""
    by_syntax: dict[str, int] = {}
    for cx in accepted:
        if cx.abstract_syntax == source.sop_class:
            by_syntax.setdefault(cx.transfer_syntax, cx.context_id)
    for ts in rank_targets(source, encodable=encodable, allow_lossy=allow_lossy):
        if ts in by_syntax:
            lossy = (ts in LOSSY and source.has_pixels and ts != source.transfer_syntax)
            return Choice(by_syntax[ts], ts, ts != source.transfer_syntax, lossy)
    return None


def recommend(accepted_syntaxes: Iterable[str]) -> str | None:
    """The smallest strategy covering every syntax the peer accepted (None: nothing accepted)."""
    syntaxes = set(accepted_syntaxes)
    if not syntaxes:
        return None
    for strategy in STRATEGIES:
        if syntaxes <= set(STRATEGY_SYNTAXES[strategy]):
            return strategy
    return "extended"


def no_context_message(sop_class: str, accepted_syntaxes: Iterable[str],
                       results: Iterable[int] = (), encodable: Iterable[str] | None = None
                       ) -> str:
    """The seed's two-line diagnosis when nothing usable was accepted for a SOP class.

    ``No compatible presentation context for '1.2.840.10008.5.1.4.1.1.2'.
    Peer accepted transfer syntaxes: ['1.2.840.10008.1.2']``, then, when the peer
    refused contexts, what it answered (``results``: the non-zero presentation
    context results it gave for the class, PS3.8 §9.3.3.2), then a
    ``Recommendation: …`` line that follows from those answers (``encodable``: what
    the relay can compress to, when known: a peer taking only lossy syntaxes the relay
    cannot produce needs its own configuration changed, not ours).
    """
    syntaxes = sorted(set(accepted_syntaxes), key=_syntax_order)
    codes = sorted({r for r in results if r != ACCEPTANCE})
    head = (f"No compatible presentation context for '{sop_class}'. "
            f"Peer accepted transfer syntaxes: {syntaxes!r}")
    if codes:
        answers = ", ".join(f"{RESULT_NAMES.get(c, 'unknown')} (result {c})" for c in codes)
        head += f"\nPeer answered: {answers}"
    strategy = recommend(syntaxes)
    name = f"'{sop_class}' ({sop_class_name(sop_class)})"
    lossy_only = bool(syntaxes) and all(ts in LOSSY for ts in syntaxes)
    producible = lossy_only and (encodable is None or any(ts in set(encodable)
                                                          for ts in syntaxes))
    if lossy_only and not producible:
        advice = (f"Recommendation: the peer takes SOP class {name} only in lossy "
                  f"syntaxes the relay cannot produce: let it accept a lossless or "
                  f"uncompressed syntax")
    elif strategy is not None:
        advice = f"Recommendation: Use '{strategy}' strategy for this peer"
        if lossy_only:
            advice += (" with allow_lossy_recompression = true (it accepts only lossy "
                       "syntaxes for this class)")
    elif codes == [ABSTRACT_SYNTAX_NOT_SUPPORTED]:
        advice = (f"Recommendation: the peer does not store SOP class {name}: add it to "
                  f"the peer's accepted SOP classes, or do not send it there")
    elif TRANSFER_SYNTAXES_NOT_SUPPORTED in codes:
        advice = (f"Recommendation: the peer takes SOP class {name} but none of the "
                  f"transfer syntaxes the relay can produce: check which ones it accepts")
    else:
        advice = (f"Recommendation: check that the peer supports SOP class {name}; it "
                  f"accepted none of the proposed contexts")
    return f"{head}\n{advice}"


def sop_class_name(uid: str) -> str:
    """Human name of a SOP class UID ("CT Image Storage"; the UID itself when unknown)."""
    from pydicom.uid import UID  # local: keep this module import-light

    name = UID(uid).name
    return name if name and name != uid else uid


def _syntax_order(ts: str) -> tuple[int, str]:
    order = (*_EXTENDED,)
    return (order.index(ts) if ts in order else len(order), ts)

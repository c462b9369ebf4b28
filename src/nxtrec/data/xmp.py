"""XMP sidecars (photo.jpg.xmp, or photo.xmp): nxtrec's keywords merged into a sidecar that
other tools may have written too, and people's keywords read back as ground truth.

Keywords live in three properties that photo managers read: `dc:subject` (flat keywords),
`lr:hierarchicalSubject` (`parent|label`, Lightroom) and `digiKam:TagsList` (`parent/label`,
digiKam). nxtrec's own namespace records the model, the date, the parent, each label with its
probability (and confidence, when a label has one), and which flat keywords nxtrec added: a
rerun removes exactly those and the hierarchical ones under nxtrec's parent, and keeps every
other keyword, property, comment and namespace prefix as it was.

xml.dom.minidom (the standard library) is used rather than ElementTree because it keeps the
file's own namespace prefixes and processing instructions (the xpacket wrapper) when it
writes the document back; ElementTree renames unknown prefixes to ns0, ns1, ..."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from xml.dom import minidom
from xml.parsers.expat import ExpatError
from xml.sax.saxutils import escape

from nxtrec.errors import NxtrecError

RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
XMLNS = "http://www.w3.org/2000/xmlns/"
DC = "http://purl.org/dc/elements/1.1/"
LR = "http://ns.adobe.com/lightroom/1.0/"
DIGIKAM = "http://www.digikam.org/ns/1.0/"
NXTREC = "https://github.com/nxtrec/nxtrec/ns/xmp/1.0/"
PREFIXES = {DC: "dc", LR: "lr", DIGIKAM: "digiKam", NXTREC: "nxtrec"}
# (namespace, property, array type) of the keyword properties, and each one's path separator
KEYWORDS = (DC, "subject", "Bag")
HIERARCHIES = (((LR, "hierarchicalSubject", "Bag"), "|"), ((DIGIKAM, "TagsList", "Seq"), "/"))
# a label's own separator character inside a hierarchical keyword: one level, not two
SEPARATOR_STANDINS = {"|": "\uff5c", "/": "\uff0f"}
# characters that XML 1.0 cannot hold (control characters, lone surrogates, U+FFFE/U+FFFF)
NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
NEW_SIDECAR = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description rdf:about=""/></rdf:RDF></x:xmpmeta>\n<?xpacket end="w"?>'
)
LABEL_FIELDS = ("label", "prob", "confidence")  # a label's struct in nxtrec:Labels
SIDECAR_NAMES = ("image", "stem")  # photo.jpg.xmp (digiKam, darktable), photo.xmp (Lightroom)


class SidecarError(NxtrecError):
    pass


@dataclass(frozen=True)
class SidecarTags:
    """What nxtrec writes into one sidecar. `labels` are records' labels: {"label", "prob"}
    and, when present, "confidence"."""

    labels: list[dict]
    model: str
    date: str  # ISO 8601
    parent: str = "nxtrec"


def sidecar_path(image: str, naming: str = "image") -> Path:
    path = Path(image)
    return path.with_name(path.name + ".xmp") if naming == "image" else path.with_suffix(".xmp")


def _parse(data: bytes, where: str) -> minidom.Document:
    try:
        doc = minidom.parseString(data)
    except ExpatError as e:
        raise SidecarError(f"{where}: not an XMP sidecar ({e}); nxtrec leaves it as it is") from None
    if _rdf(doc) is None:
        raise SidecarError(f"{where}: not an XMP sidecar (no rdf:RDF); nxtrec leaves it as it is")
    return doc


# The walks below follow XMP's fixed nesting (x:xmpmeta > rdf:RDF > rdf:Description >
# property > array > rdf:li) instead of searching the whole tree: 3x faster with minidom.
def _children(node, ns: str | None = None, name: str | None = None) -> list:
    return [c for c in node.childNodes if c.nodeType == c.ELEMENT_NODE and (ns is None or c.namespaceURI == ns)
            and (name is None or c.localName == name)]  # fmt: skip


def _rdf(doc: minidom.Document):
    top = doc.documentElement
    found = [top] if (top.namespaceURI, top.localName) == (RDF, "RDF") else _children(top, RDF, "RDF")
    return found[0] if found else None


def _descriptions(doc: minidom.Document) -> list:
    return _children(_rdf(doc), RDF, "Description")


def _array_items(array) -> list[str]:
    return [li.firstChild.data if li.firstChild else "" for li in _children(array, RDF, "li")]


def _items(prop) -> list[str]:
    return [item for array in _children(prop, RDF) for item in _array_items(array)]


def _property(doc: minidom.Document, ns: str, name: str):
    found = [p for d in _descriptions(doc) for p in _children(d, ns, name)]
    return found[0] if found else None


def _nxtrec_state(doc: minidom.Document) -> tuple[list[str], list[str]]:
    """The flat keywords nxtrec added and the parents it wrote under, by its last run."""
    added = _property(doc, NXTREC, "Added")
    parents = [el.firstChild.data for d in _descriptions(doc) for el in _children(d, NXTREC, "Parent") if el.firstChild]
    parents += [d.getAttributeNS(NXTREC, "Parent") for d in _descriptions(doc) if d.hasAttributeNS(NXTREC, "Parent")]
    return (_items(added) if added is not None else []), parents


def people_keywords(data: bytes, where: str = "sidecar") -> list[str]:
    """The flat keywords (dc:subject) of a sidecar that nxtrec did not add, in file order."""
    doc = _parse(data, where)
    subject = _property(doc, *KEYWORDS[:2])
    added = set(_nxtrec_state(doc)[0])
    return [k for k in (_items(subject) if subject is not None else []) if k not in added]


def _declare(element, ns: str) -> str:
    """A prefix bound to `ns` on `element` (its usual one unless that is taken there)."""
    prefix, n = PREFIXES[ns], 1
    while element.hasAttribute(f"xmlns:{prefix}") and element.getAttribute(f"xmlns:{prefix}") != ns:
        prefix, n = f"{PREFIXES[ns]}{n}", n + 1
    element.setAttributeNS(XMLNS, f"xmlns:{prefix}", ns)
    return prefix


def _array(doc, description, spec: tuple[str, str, str]):
    """The rdf:Bag / rdf:Seq of property `spec`, created in `description` when missing."""
    ns, name, kind = spec
    prop = _property(doc, ns, name)
    if prop is None:
        prop = doc.createElementNS(ns, f"{_declare(description, ns)}:{name}")
        description.appendChild(prop)
    arrays = _children(prop, RDF)
    if arrays:
        return arrays[0]
    array = doc.createElementNS(RDF, f"{description.prefix or 'rdf'}:{kind}")
    prop.appendChild(array)
    return array


def _set_items(doc, array, keep, add: list[str]) -> None:
    """Remove the items of `array` that `keep` rejects, then append `add` (those not there)."""
    for li in _children(array):
        if not keep(li.firstChild.data if li.firstChild else ""):
            array.removeChild(li)
    present = set(_array_items(array))
    for value in add:
        if value not in present:
            li = doc.createElementNS(RDF, f"{array.prefix or 'rdf'}:li")
            li.appendChild(doc.createTextNode(value))
            array.appendChild(li)
            present.add(value)
    prop = array.parentNode
    if not _array_items(array) and prop.parentNode is not None:
        prop.parentNode.removeChild(prop)  # no empty keyword lists left behind


def _remove_nxtrec_properties(doc) -> None:
    for description in _descriptions(doc):
        for child in _children(description, NXTREC):
            description.removeChild(child)
        for attr in [a for a in description.attributes.values() if a.namespaceURI == NXTREC]:
            description.removeAttributeNode(attr)


def _text_element(doc, description, name: str, text: str):
    element = doc.createElementNS(NXTREC, f"{_declare(description, NXTREC)}:{name}")
    element.appendChild(doc.createTextNode(text))
    return element


def _write_nxtrec_properties(doc, description, tags: SidecarTags, added: list[str]) -> None:
    rdf = description.prefix or "rdf"
    # not "Model" or "Date": tools that read exiftool's flat tag names take those for the camera's
    for name, text in (("TaggerModel", tags.model), ("TaggedAt", tags.date), ("Parent", tags.parent)):
        description.appendChild(_text_element(doc, description, name, text))
    for name, kind, values in (("Added", "Bag", added), ("Labels", "Seq", tags.labels)):
        prop = doc.createElementNS(NXTREC, f"{_declare(description, NXTREC)}:{name}")
        array = prop.appendChild(doc.createElementNS(RDF, f"{rdf}:{kind}"))
        for value in values:
            li = array.appendChild(doc.createElementNS(RDF, f"{rdf}:li"))
            if isinstance(value, str):
                li.appendChild(doc.createTextNode(value))
                continue
            li.setAttributeNS(RDF, f"{rdf}:parseType", "Resource")  # a struct: label, prob, confidence
            for field in LABEL_FIELDS:
                if field in value:
                    li.appendChild(_text_element(doc, description, field.capitalize(), str(value[field])))
        description.appendChild(prop)


def xml_text(text: str) -> str:
    """`text` without the characters XML cannot hold (a random or byte-level model can write
    control characters): what is written must read back as it was written."""
    return NOT_XML.sub("", text)


def xml_safe(tags: SidecarTags) -> SidecarTags:
    labels = [{**lab, "label": xml_text(lab["label"])} for lab in tags.labels]
    return replace(tags, labels=labels, model=xml_text(tags.model), parent=xml_text(tags.parent))


def hierarchical(parent: str, label: str, separator: str) -> str:
    return parent + separator + label.replace(separator, SEPARATOR_STANDINS[separator])


def _new_sidecar(tags: SidecarTags) -> bytes:
    """What merged_sidecar writes when there is no sidecar yet, from a template: a fifth of
    the CPU time of building the document, in the common case of a first run (see
    docs/formats.md#speed). tests/test_xmp.py checks that exiftool reads both alike."""
    labels = list(dict.fromkeys(lab["label"] for lab in tags.labels))

    def array(prop: str, kind: str, items: list[str], always: bool = False) -> str:
        lis = "".join(f"<rdf:li>{escape(item)}</rdf:li>" for item in items)
        return f"<{prop}><rdf:{kind}>{lis}</rdf:{kind}></{prop}>" if items or always else ""

    def text(name: str, value) -> str:
        return f"<nxtrec:{name}>{escape(str(value))}</nxtrec:{name}>"

    structs = "".join('<rdf:li rdf:parseType="Resource">' + "".join(
        text(field.capitalize(), lab[field]) for field in LABEL_FIELDS if field in lab) + "</rdf:li>" for lab in tags.labels)  # fmt: skip
    hierarchies = [array(f"{PREFIXES[ns]}:{name}", kind, [hierarchical(tags.parent, lab, sep) for lab in labels])
                   for (ns, name, kind), sep in HIERARCHIES]  # fmt: skip
    body = (array("dc:subject", "Bag", labels) + "".join(hierarchies) + text("TaggerModel", tags.model)
            + text("TaggedAt", tags.date) + text("Parent", tags.parent) + array("nxtrec:Added", "Bag", labels, True)
            + f"<nxtrec:Labels><rdf:Seq>{structs}</rdf:Seq></nxtrec:Labels>")  # fmt: skip
    namespaces = "".join(f' xmlns:{prefix}="{ns}"' for ns, prefix in PREFIXES.items())
    description = f'<rdf:Description rdf:about=""{namespaces}>{body}</rdf:Description>'
    return NEW_SIDECAR.replace('<rdf:Description rdf:about=""/>', description).encode("utf-8")


def merged_sidecar(old: bytes | None, tags: SidecarTags, where: str = "sidecar") -> bytes:
    """The sidecar with nxtrec's keywords and properties replaced by `tags`' (a new one when
    `old` is None); everything else is kept. A file that is not XMP is a SidecarError."""
    if old is None:
        return _new_sidecar(xml_safe(tags))
    doc, tags = _parse(old, where), xml_safe(tags)
    old_added, old_parents = _nxtrec_state(doc)
    description = _descriptions(doc)
    if not description:
        rdf = _rdf(doc)
        description = [rdf.appendChild(doc.createElementNS(RDF, f"{rdf.prefix or 'rdf'}:Description"))]
        description[0].setAttributeNS(RDF, f"{rdf.prefix or 'rdf'}:about", "")
    target = description[0]
    labels = [lab["label"] for lab in tags.labels]
    subject = _property(doc, *KEYWORDS[:2])
    people = set(_items(subject) if subject is not None else []) - set(old_added)
    _set_items(doc, _array(doc, target, KEYWORDS), lambda k: k not in old_added, labels)
    for spec, sep in HIERARCHIES:
        ours = tuple(p + sep for p in {*old_parents, tags.parent})
        _set_items(doc, _array(doc, target, spec), lambda k, ours=ours: not k.startswith(ours),
                   [hierarchical(tags.parent, label, sep) for label in labels])  # fmt: skip
    _remove_nxtrec_properties(doc)
    _write_nxtrec_properties(doc, target, tags, [k for k in dict.fromkeys(labels) if k not in people])
    if old.lstrip().startswith(b"<?xml"):
        return doc.toxml(encoding="utf-8")
    # the xpacket wrapper first, as it was (minidom would put an XML declaration before it)
    return "\n".join(node.toxml() for node in doc.childNodes).encode("utf-8")


def ground_truth(images: list[tuple[str, str]], naming: str = "image") -> tuple[list[dict], int]:
    """`{"image": ID, "gt": people's keywords}` for each (id, path) whose sidecar holds a
    keyword that nxtrec did not add, and how many images had none (left out)."""
    rows, without = [], 0
    for image_id, path in images:
        sidecar = sidecar_path(path, naming)
        try:
            data = sidecar.read_bytes()
        except FileNotFoundError:
            without += 1
            continue
        except OSError as e:
            raise SidecarError(f"{sidecar}: cannot read ({e.strerror})") from None
        keywords = people_keywords(data, str(sidecar))
        if keywords:
            rows.append({"image": image_id, "gt": keywords})
        else:
            without += 1
    return rows, without

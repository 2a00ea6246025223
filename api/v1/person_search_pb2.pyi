import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TimeRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    def __init__(self, start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ThiOptions(_message.Message):
    __slots__ = ("enabled", "candidates", "xi", "confirmed_anchor_image_id")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    XI_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_ANCHOR_IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    candidates: int
    xi: float
    confirmed_anchor_image_id: str
    def __init__(self, enabled: _Optional[bool] = ..., candidates: _Optional[int] = ..., xi: _Optional[float] = ..., confirmed_anchor_image_id: _Optional[str] = ..., **kwargs) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("text", "top_k", "camera_ids", "time_range", "thi", "image", "image_weight", "group_by_track")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    CAMERA_IDS_FIELD_NUMBER: _ClassVar[int]
    TIME_RANGE_FIELD_NUMBER: _ClassVar[int]
    THI_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_TRACK_FIELD_NUMBER: _ClassVar[int]
    text: str
    top_k: int
    camera_ids: _containers.RepeatedScalarFieldContainer[str]
    time_range: TimeRange
    thi: ThiOptions
    image: bytes
    image_weight: float
    group_by_track: bool
    def __init__(self, text: _Optional[str] = ..., top_k: _Optional[int] = ..., camera_ids: _Optional[_Iterable[str]] = ..., time_range: _Optional[_Union[TimeRange, _Mapping]] = ..., thi: _Optional[_Union[ThiOptions, _Mapping]] = ..., image: _Optional[bytes] = ..., image_weight: _Optional[float] = ..., group_by_track: _Optional[bool] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("image_id", "camera_id", "captured_at", "score", "track_id", "image_uri", "track_hits")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_AT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TRACK_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URI_FIELD_NUMBER: _ClassVar[int]
    TRACK_HITS_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    camera_id: str
    captured_at: _timestamp_pb2.Timestamp
    score: float
    track_id: str
    image_uri: str
    track_hits: int
    def __init__(self, image_id: _Optional[str] = ..., camera_id: _Optional[str] = ..., captured_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., score: _Optional[float] = ..., track_id: _Optional[str] = ..., image_uri: _Optional[str] = ..., track_hits: _Optional[int] = ...) -> None: ...

class ThiCandidate(_message.Message):
    __slots__ = ("image_id", "base_rank", "base_score", "p_yes", "asked")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_RANK_FIELD_NUMBER: _ClassVar[int]
    BASE_SCORE_FIELD_NUMBER: _ClassVar[int]
    P_YES_FIELD_NUMBER: _ClassVar[int]
    ASKED_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    base_rank: int
    base_score: float
    p_yes: float
    asked: bool
    def __init__(self, image_id: _Optional[str] = ..., base_rank: _Optional[int] = ..., base_score: _Optional[float] = ..., p_yes: _Optional[float] = ..., asked: _Optional[bool] = ...) -> None: ...

class ThiTrace(_message.Message):
    __slots__ = ("candidates", "anchor_image_id", "vqa_answers", "refined_query", "fallback_reason", "mllm_calls", "anchor_confirmed")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    VQA_ANSWERS_FIELD_NUMBER: _ClassVar[int]
    REFINED_QUERY_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    MLLM_CALLS_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_CONFIRMED_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[ThiCandidate]
    anchor_image_id: str
    vqa_answers: _containers.RepeatedScalarFieldContainer[str]
    refined_query: str
    fallback_reason: str
    mllm_calls: int
    anchor_confirmed: bool
    def __init__(self, candidates: _Optional[_Iterable[_Union[ThiCandidate, _Mapping]]] = ..., anchor_image_id: _Optional[str] = ..., vqa_answers: _Optional[_Iterable[str]] = ..., refined_query: _Optional[str] = ..., fallback_reason: _Optional[str] = ..., mllm_calls: _Optional[int] = ..., anchor_confirmed: _Optional[bool] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "thi_trace")
    HITS_FIELD_NUMBER: _ClassVar[int]
    THI_TRACE_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    thi_trace: ThiTrace
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., thi_trace: _Optional[_Union[ThiTrace, _Mapping]] = ...) -> None: ...

class ThiAnchor(_message.Message):
    __slots__ = ("image_id", "base_rank", "confirmed")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_RANK_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    base_rank: int
    confirmed: bool
    def __init__(self, image_id: _Optional[str] = ..., base_rank: _Optional[int] = ..., confirmed: _Optional[bool] = ...) -> None: ...

class ThiVqa(_message.Message):
    __slots__ = ("image_id", "answers", "cached")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    answers: _containers.RepeatedScalarFieldContainer[str]
    cached: bool
    def __init__(self, image_id: _Optional[str] = ..., answers: _Optional[_Iterable[str]] = ..., cached: _Optional[bool] = ...) -> None: ...

class ThiRefinedQuery(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class SearchEvent(_message.Message):
    __slots__ = ("base", "candidate", "anchor", "vqa", "refined_query", "result")
    BASE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_FIELD_NUMBER: _ClassVar[int]
    VQA_FIELD_NUMBER: _ClassVar[int]
    REFINED_QUERY_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    base: SearchResponse
    candidate: ThiCandidate
    anchor: ThiAnchor
    vqa: ThiVqa
    refined_query: ThiRefinedQuery
    result: SearchResponse
    def __init__(self, base: _Optional[_Union[SearchResponse, _Mapping]] = ..., candidate: _Optional[_Union[ThiCandidate, _Mapping]] = ..., anchor: _Optional[_Union[ThiAnchor, _Mapping]] = ..., vqa: _Optional[_Union[ThiVqa, _Mapping]] = ..., refined_query: _Optional[_Union[ThiRefinedQuery, _Mapping]] = ..., result: _Optional[_Union[SearchResponse, _Mapping]] = ...) -> None: ...

class ListImagesRequest(_message.Message):
    __slots__ = ("camera_ids", "time_range", "page_size", "page_token")
    CAMERA_IDS_FIELD_NUMBER: _ClassVar[int]
    TIME_RANGE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    camera_ids: _containers.RepeatedScalarFieldContainer[str]
    time_range: TimeRange
    page_size: int
    page_token: str
    def __init__(self, camera_ids: _Optional[_Iterable[str]] = ..., time_range: _Optional[_Union[TimeRange, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListImagesResponse(_message.Message):
    __slots__ = ("images", "next_page_token")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[GalleryImage]
    next_page_token: str
    def __init__(self, images: _Optional[_Iterable[_Union[GalleryImage, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetImageRequest(_message.Message):
    __slots__ = ("image_id",)
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    def __init__(self, image_id: _Optional[str] = ...) -> None: ...

class GalleryStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CameraStats(_message.Message):
    __slots__ = ("camera_id", "images")
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    images: int
    def __init__(self, camera_id: _Optional[str] = ..., images: _Optional[int] = ...) -> None: ...

class GalleryStats(_message.Message):
    __slots__ = ("images", "cameras", "oldest_captured_at", "newest_captured_at")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CAMERAS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_CAPTURED_AT_FIELD_NUMBER: _ClassVar[int]
    NEWEST_CAPTURED_AT_FIELD_NUMBER: _ClassVar[int]
    images: int
    cameras: _containers.RepeatedCompositeFieldContainer[CameraStats]
    oldest_captured_at: _timestamp_pb2.Timestamp
    newest_captured_at: _timestamp_pb2.Timestamp
    def __init__(self, images: _Optional[int] = ..., cameras: _Optional[_Iterable[_Union[CameraStats, _Mapping]]] = ..., oldest_captured_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., newest_captured_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GalleryImage(_message.Message):
    __slots__ = ("image_id", "camera_id", "captured_at", "track_id", "image_uri", "image")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_AT_FIELD_NUMBER: _ClassVar[int]
    TRACK_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URI_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    camera_id: str
    captured_at: _timestamp_pb2.Timestamp
    track_id: str
    image_uri: str
    image: bytes
    def __init__(self, image_id: _Optional[str] = ..., camera_id: _Optional[str] = ..., captured_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., track_id: _Optional[str] = ..., image_uri: _Optional[str] = ..., image: _Optional[bytes] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[GalleryImage]
    def __init__(self, images: _Optional[_Iterable[_Union[GalleryImage, _Mapping]]] = ...) -> None: ...

class EnrollResult(_message.Message):
    __slots__ = ("image_id", "status", "reason")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[EnrollResult.Status]
        ACCEPTED: _ClassVar[EnrollResult.Status]
        REJECTED: _ClassVar[EnrollResult.Status]
    STATUS_UNSPECIFIED: EnrollResult.Status
    ACCEPTED: EnrollResult.Status
    REJECTED: EnrollResult.Status
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    status: EnrollResult.Status
    reason: str
    def __init__(self, image_id: _Optional[str] = ..., status: _Optional[_Union[EnrollResult.Status, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EnrollResult]
    def __init__(self, results: _Optional[_Iterable[_Union[EnrollResult, _Mapping]]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("image_ids", "camera_ids", "time_range")
    IMAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    CAMERA_IDS_FIELD_NUMBER: _ClassVar[int]
    TIME_RANGE_FIELD_NUMBER: _ClassVar[int]
    image_ids: _containers.RepeatedScalarFieldContainer[str]
    camera_ids: _containers.RepeatedScalarFieldContainer[str]
    time_range: TimeRange
    def __init__(self, image_ids: _Optional[_Iterable[str]] = ..., camera_ids: _Optional[_Iterable[str]] = ..., time_range: _Optional[_Union[TimeRange, _Mapping]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

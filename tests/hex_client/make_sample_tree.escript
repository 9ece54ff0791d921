#!/usr/bin/env escript
%% -*- erlang -*-
%%
%% Makes Hex fixtures with the hex_core code that rebar3 3.19 vendors
%% (modules r3_hex_*), i.e. with the reference implementation:
%%
%%   escript make_sample_tree.escript tarball OUT_DIR NAME VERSION [DEP:REQ[:optional] ...]
%%       Writes OUT_DIR/NAME-VERSION.tar, a Hex package tarball made by
%%       r3_hex_tarball:create/2 (metadata: name, version, app, description,
%%       licenses, build_tools, files, requirements from DEP:REQ). Prints
%%       "PATH inner_checksum=HEX outer_checksum=HEX".
%%
%%   escript make_sample_tree.escript tree OUT_DIR REPO_NAME [VARIANT]
%%       Writes a small complete registry tree signed with a fresh RSA-2048 key:
%%       OUT_DIR/{names,versions,packages/alpha,packages/beta,tarballs/*.tar,
%%       public_key,private_key.pem}. Package beta has a niso-only release
%%       2.1.0 (no tarball, no outer_checksum, extra protobuf fields >= 100).
%%       VARIANT (default good) makes a deliberately broken tree instead:
%%         bad-signature      one byte of packages/alpha's signature changed
%%         unsigned           packages/alpha without Signed.signature
%%         wrong-key          everything signed with another key than public_key
%%         package-repo       packages/beta says repository "other" (validly signed)
%%         package-name       packages/beta says name "alpha" (validly signed)
%%         bad-outer-checksum alpha 1.0.0 outer_checksum wrong (validly signed)
%%         bad-inner-checksum alpha 1.0.0 inner_checksum wrong (validly signed)
%%         tampered-tarball   one byte of tarballs/alpha-1.0.0.tar changed
%%         missing-tarball    tarballs/beta-2.0.0.tar deleted
%%         not-gzip           packages/beta written without gzip
%%
%% The rebar3 escript is located with $REBAR3 if set, else `rebar3` on PATH.
-module(make_sample_tree).
-mode(compile).
-export([main/1]).

main(["tarball", OutDir, Name, Version | Deps]) ->
    load_hex_core(),
    Reqs = [parse_dep(D) || D <- Deps],
    {Path, Inner, Outer} = write_tarball(OutDir, list_to_binary(Name),
                                         list_to_binary(Version), Reqs),
    io:format("~s inner_checksum=~s outer_checksum=~s~n", [Path, hex(Inner), hex(Outer)]),
    halt(0);
main(["tree", OutDir, Repo]) ->
    main(["tree", OutDir, Repo, "good"]);
main(["tree", OutDir, Repo, Variant]) ->
    load_hex_core(),
    make_tree(OutDir, list_to_binary(Repo), Variant),
    io:format("wrote tree ~s (repository ~s, variant ~s)~n", [OutDir, Repo, Variant]),
    halt(0);
main(_) ->
    io:format(standard_error,
              "usage: escript make_sample_tree.escript tarball OUT_DIR NAME VERSION [DEP:REQ[:optional] ...]~n"
              "       escript make_sample_tree.escript tree OUT_DIR REPO_NAME [VARIANT]~n", []),
    halt(2).

parse_dep(S) ->
    case string:split(S, ":", all) of
        [D, R] -> {list_to_binary(D), list_to_binary(R), false};
        [D, R, "optional"] -> {list_to_binary(D), list_to_binary(R), true};
        _ -> io:format(standard_error, "bad dependency ~s (want DEP:REQ[:optional])~n", [S]),
             halt(2)
    end.

%%--------------------------------------------------------------------
%% loading hex_core from the rebar3 escript (same as check_tree.escript)

load_hex_core() ->
    Rebar3 = case os:getenv("REBAR3") of
                 V when V =:= false; V =:= "" -> os:find_executable("rebar3");
                 P -> P
             end,
    Rebar3 =:= false andalso die("rebar3 not found on PATH (set REBAR3=...)", []),
    {ok, Sections} = escript:extract(Rebar3, []),
    {archive, Archive} = lists:keyfind(archive, 1, Sections),
    {ok, Files} = zip:extract(Archive, [memory]),
    [{module, M} = code:load_binary(M, Rebar3 ++ "/" ++ N, B)
     || {N, B} <- Files,
        filename:extension(N) =:= ".beam",
        hex_core_module(filename:basename(N, ".beam")),
        M <- [list_to_atom(filename:basename(N, ".beam"))]],
    code:is_loaded(r3_hex_tarball) =:= false andalso die("no r3_hex_tarball in ~s", [Rebar3]),
    {ok, _} = application:ensure_all_started(crypto),
    {ok, _} = application:ensure_all_started(public_key),
    ok.

hex_core_module(Mod) ->
    lists:prefix("r3_hex_", Mod) orelse Mod =:= "r3_safe_erl_term".

die(Fmt, Args) ->
    io:format(standard_error, Fmt ++ "~n", Args),
    halt(1).

hex(B) -> string:lowercase(binary:encode_hex(B)).

%%--------------------------------------------------------------------
%% tarballs

%% Reqs: [{Dep, Requirement, Optional}]
make_tarball(Name, Version, Reqs) ->
    Erl = <<"-module(", Name/binary, ").\n-export([hello/0]).\n"
            "hello() -> {", Name/binary, ", <<\"", Version/binary, "\">>}.\n">>,
    AppSrc = iolist_to_binary(
               io_lib:format("{application, ~s, [{description, \"niso fixture\"}, "
                             "{vsn, \"~s\"}, {applications, [kernel, stdlib~s]}]}.~n",
                             [Name, Version, [[", ", D] || {D, _, _} <- Reqs]])),
    RebarConfig = iolist_to_binary(
                    io_lib:format("{deps, [~s]}.~n",
                                  [lists:join(", ", [io_lib:format("{~s, ~p}", [D, binary_to_list(R)])
                                                     || {D, R, _} <- Reqs])])),
    Files = [{"rebar.config", RebarConfig},
             {"src/" ++ binary_to_list(Name) ++ ".app.src", AppSrc},
             {"src/" ++ binary_to_list(Name) ++ ".erl", Erl}],
    Metadata = #{<<"name">> => Name,
                 <<"version">> => Version,
                 <<"app">> => Name,
                 <<"description">> => <<"niso test fixture ", Name/binary>>,
                 <<"licenses">> => [<<"Apache-2.0">>],
                 <<"links">> => #{},
                 <<"build_tools">> => [<<"rebar3">>],
                 <<"files">> => [list_to_binary(F) || {F, _} <- Files],
                 <<"requirements">> =>
                     maps:from_list([{D, #{<<"app">> => D,
                                           <<"optional">> => Opt,
                                           <<"requirement">> => R}}
                                     || {D, R, Opt} <- Reqs])},
    case r3_hex_tarball:create(Metadata, Files) of
        {ok, #{tarball := Tar, inner_checksum := Inner, outer_checksum := Outer}} ->
            {Tar, Inner, Outer};
        {error, Reason} ->
            die("r3_hex_tarball:create failed: ~s", [r3_hex_tarball:format_error(Reason)])
    end.

write_tarball(OutDir, Name, Version, Reqs) ->
    {Tar, Inner, Outer} = make_tarball(Name, Version, Reqs),
    Path = filename:join(OutDir, <<Name/binary, "-", Version/binary, ".tar">>),
    ok = filelib:ensure_dir(Path),
    ok = file:write_file(Path, Tar),
    {Path, Inner, Outer}.

%%--------------------------------------------------------------------
%% raw protobuf bits (only for fields hex_core does not know)

varint(N) when N < 128 -> <<N>>;
varint(N) -> <<(128 bor (N band 127)), (varint(N bsr 7))/binary>>.

pb_len(Field, Bin) -> [varint((Field bsl 3) bor 2), varint(byte_size(Bin)), Bin].
pb_varint(Field, N) -> [varint(Field bsl 3), varint(N)].

%%--------------------------------------------------------------------
%% tree

make_tree(Out, Repo, Variant) ->
    ok = filelib:ensure_dir(filename:join([Out, "packages", "x"])),
    ok = filelib:ensure_dir(filename:join([Out, "tarballs", "x"])),
    Key = public_key:generate_key({rsa, 2048, 65537}),
    Pub = public_key_of(Key),
    ok = file:write_file(filename:join(Out, "private_key.pem"),
                         public_key:pem_encode([public_key:pem_entry_encode('RSAPrivateKey', Key)])),
    ok = file:write_file(filename:join(Out, "public_key"),
                         public_key:pem_encode([public_key:pem_entry_encode('SubjectPublicKeyInfo', Pub)])),
    SignKey = case Variant of
                  "wrong-key" -> public_key:generate_key({rsa, 2048, 65537});
                  _ -> Key
              end,
    %% tarballs, made by hex_core
    TarDir = filename:join(Out, "tarballs"),
    {_, A01In, A01Out} = write_tarball(TarDir, <<"alpha">>, <<"0.1.0">>, []),
    {A10Path, A10In, A10Out} = write_tarball(TarDir, <<"alpha">>, <<"1.0.0">>,
                                             [{<<"beta">>, <<"~> 2.0">>, false}]),
    {B20Path, B20In, B20Out} = write_tarball(TarDir, <<"beta">>, <<"2.0.0">>, []),
    {A10InI, A10OutI} = case Variant of
                            "bad-inner-checksum" -> {flip(A10In, 0), A10Out};
                            "bad-outer-checksum" -> {A10In, flip(A10Out, 0)};
                            _ -> {A10In, A10Out}
                        end,
    %% packages/alpha: a retired release and one with a dependency
    Alpha = r3_hex_registry:encode_package(
              #{name => <<"alpha">>, repository => Repo,
                releases =>
                    [#{version => <<"0.1.0">>, inner_checksum => A01In,
                       outer_checksum => A01Out, dependencies => [],
                       retired => #{reason => 'RETIRED_SECURITY',
                                    message => <<"CVE-0000-0000">>}},
                     #{version => <<"1.0.0">>, inner_checksum => A10InI,
                       outer_checksum => A10OutI,
                       dependencies => [#{package => <<"beta">>,
                                          requirement => <<"~> 2.0">>,
                                          optional => false,
                                          app => <<"beta">>}]}]}),
    %% packages/beta: one hex release and one niso-only release that carries
    %% fields >= 100 hex_core does not know (and no outer_checksum/tarball)
    BetaRepo = case Variant of "package-repo" -> <<"other">>; _ -> Repo end,
    BetaName = case Variant of "package-name" -> <<"alpha">>; _ -> <<"beta">> end,
    B20 = r3_hex_pb_package:encode_msg(#{version => <<"2.0.0">>, inner_checksum => B20In,
                                         outer_checksum => B20Out, dependencies => []},
                                       'Release'),
    B21 = iolist_to_binary(
            [r3_hex_pb_package:encode_msg(#{version => <<"2.1.0">>,
                                            inner_checksum => crypto:hash(sha256, <<"niso">>),
                                            dependencies => []}, 'Release'),
             pb_len(100, <<"niso-only artifact kind">>),
             pb_varint(101, 42)]),
    Beta = iolist_to_binary(
             [pb_len(1, B20), pb_len(1, B21),
              r3_hex_pb_package:encode_msg(#{name => BetaName, repository => BetaRepo,
                                             releases => []}, 'Package'),
              pb_len(100, <<"package-level niso extension">>)]),
    Names = r3_hex_registry:encode_names(
              #{repository => Repo,
                packages => [#{name => <<"alpha">>}, #{name => <<"beta">>}]}),
    %% versions: the niso-only beta 2.1.0 is left out (hex clients can't use it)
    Versions = r3_hex_registry:encode_versions(
                 #{repository => Repo,
                   packages => [#{name => <<"alpha">>, versions => [<<"0.1.0">>, <<"1.0.0">>],
                                  retired => [0]},
                                #{name => <<"beta">>, versions => [<<"2.0.0">>], retired => []}]}),
    Write = fun(Rel, Signed) -> ok = file:write_file(filename:join(Out, Rel), zlib:gzip(Signed)) end,
    Sign = fun(Payload) -> r3_hex_registry:sign_protobuf(Payload, SignKey) end,
    Write("names", Sign(Names)),
    Write("versions", Sign(Versions)),
    AlphaSigned =
        case Variant of
            "bad-signature" ->
                Sig = r3_hex_registry:sign(Alpha, SignKey),
                r3_hex_pb_signed:encode_msg(#{payload => Alpha, signature => flip(Sig, 100)},
                                            'Signed');
            "unsigned" ->
                r3_hex_pb_signed:encode_msg(#{payload => Alpha}, 'Signed');
            _ ->
                Sign(Alpha)
        end,
    Write("packages/alpha", AlphaSigned),
    case Variant of
        "not-gzip" -> ok = file:write_file(filename:join(Out, "packages/beta"), Sign(Beta));
        _ -> Write("packages/beta", Sign(Beta))
    end,
    case Variant of
        "tampered-tarball" ->
            {ok, T} = file:read_file(A10Path),
            ok = file:write_file(A10Path, flip(T, byte_size(T) - 600));
        "missing-tarball" ->
            ok = file:delete(B20Path);
        _ ->
            ok
    end,
    Known = ["good", "bad-signature", "unsigned", "wrong-key", "package-repo", "package-name",
             "bad-outer-checksum", "bad-inner-checksum", "tampered-tarball", "missing-tarball",
             "not-gzip"],
    lists:member(Variant, Known) orelse die("unknown variant ~s", [Variant]),
    ok.

flip(Bin, Pos) ->
    <<Pre:Pos/binary, B, Rest/binary>> = Bin,
    <<Pre/binary, (B bxor 16#01), Rest/binary>>.

%% #'RSAPrivateKey'{} -> #'RSAPublicKey'{} without public_key.hrl (Debian ships the
%% .hrl files in erlang-dev, which we don't need otherwise)
public_key_of(Key) when element(1, Key) =:= 'RSAPrivateKey' ->
    {'RSAPublicKey', element(3, Key), element(4, Key)}.
